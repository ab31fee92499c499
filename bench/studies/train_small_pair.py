"""Train a small Gemma 4 unified target and its MTP assistant on the Python standard library, on a CPU, offline.

    python bench/studies/train_small_pair.py --out bench/artifacts/small-pair

The target is a `Gemma4UnifiedForConditionalGeneration` with the 12B's layer kinds (five sliding layers, then one
full layer with k_eq_v and one wide kv head) at small sizes; the assistant is a `Gemma4UnifiedAssistantForCausalLM`
trained on the frozen target, the way transformers' `SinglePositionMultiTokenCandidateGenerator` drives it: its
input is the target's embedding of the last token next to the target's last hidden state, it sits at one fixed
position, attends over the target's own keys and values (last sliding and last full layer), and chains its own
projected state from one draft to the next. Both are saved in the reference's HF format with a SentencePiece
tokenizer and a Gemma-4-style chat template. Fixed step counts and a seed make a run reproducible.
"""

import argparse
import json
import math
import random
import shutil
import sys
import sysconfig
import time
from pathlib import Path

SPECIAL_TOKENS = ["<mask>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>",
                  "<|audio|>", "<|video|>", "<|channel>", "<channel|>", "<|think|>", "\n"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "<|turn>{{ role }}\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'text' %}{{ item['text'] | trim }}"
    "{% elif item['type'] == 'image' %}<|image|>{% elif item['type'] == 'audio' %}<|audio|>"
    "{% elif item['type'] == 'video' %}<|video|>{% endif %}"
    "{% endfor %}{% endif %}<turn|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model\n{% endif %}"
)
SLIDING, FULL = "sliding_attention", "full_attention"
HELD_OUT_FRACTION = 0.05
# Sliding layers' head size and full layers' (global) head size; the assistant reads the target's keys, so shares them.
HEAD_DIM, GLOBAL_HEAD_DIM, KV_HEADS = 32, 64, 2
# Draft rounds of the acceptance measurement: K drafts per target pass, as an MTP loop would run them.
ACCEPTANCE_DRAFT_TOKENS = 4


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/artifacts/small-pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--corpus-megabytes", type=float, default=12.0)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--target-steps", type=int, default=800)
    parser.add_argument("--assistant-steps", type=int, default=400)
    parser.add_argument("--assistant-batch-size", type=int, default=8)
    parser.add_argument("--assistant-unroll", type=int, default=3, help="chained draft steps trained per position")
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-prompts", type=int, default=24)
    parser.add_argument("--perplexity-windows", type=int, help="held-out windows scored (default: all of them)")
    return parser.parse_args(argv)


def stdlib_texts(seed: int, megabytes: float) -> tuple:
    """Python sources of the standard library (tests and third-party packages left out), split by file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "test", "tests", "idle_test", "__pycache__"} & set(p.parts))
    random.Random(seed).shuffle(files)
    texts, size = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size > megabytes * 1e6:
            break
    held_out = max(1, int(len(texts) * HELD_OUT_FRACTION))
    return texts[held_out:], texts[:held_out]


def train_tokenizer(texts: list, folder: Path, vocab_size: int, seed: int):
    import sentencepiece
    from transformers import GemmaTokenizer

    pieces = (block for text in texts for block in text.split("\n\n") if block.strip())
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=pieces, model_prefix=str(folder / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
        bos_piece="<bos>", unk_piece="<unk>", user_defined_symbols=SPECIAL_TOKENS,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=1 << 16, input_sentence_size=300_000, shuffle_input_sentence=False,
        num_threads=2, minloglevel=2,
    )
    (folder / "tokenizer.vocab").unlink()
    tokenizer = GemmaTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def target_config(vocab: dict, vocab_size: int):
    from transformers import Gemma4UnifiedConfig

    text = dict(
        hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM, global_head_dim=GLOBAL_HEAD_DIM, num_global_key_value_heads=1, attention_k_eq_v=True,
        vocab_size=vocab_size, sliding_window=128, final_logit_softcapping=30.0, max_position_embeddings=8192,
        layer_types=[SLIDING] * 5 + [FULL], pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return Gemma4UnifiedConfig(
        text_config=text, vision_config=dict(mm_embed_dim=64, output_proj_dims=64, mm_posemb_size=64),
        audio_config=dict(audio_embed_dim=640),
        boi_token_id=vocab["<|image>"], eoi_token_id=vocab["<image|>"], image_token_id=vocab["<|image|>"],
        boa_token_id=vocab["<|audio>"], eoa_token_index=vocab["<audio|>"], audio_token_id=vocab["<|audio|>"],
        video_token_id=vocab["<|video|>"], eos_token_id=[1, vocab["<turn|>"]],
    )


def allow_all_reuse_layers():
    """transformers 5.23's `kv_sharing_modes` raises when every layer reuses the target's KV (no layer of the
    assistant makes one), which is exactly the assistant's case; say "reuse" for every layer there."""
    from transformers import Gemma4UnifiedTextConfig

    original = Gemma4UnifiedTextConfig.kv_sharing_modes.fget
    if getattr(original, "allows_all_reuse", False):
        return

    def kv_sharing_modes(config):
        if config.num_kv_shared_layers == config.num_hidden_layers:
            return ["reuse"] * config.num_hidden_layers
        return original(config)

    kv_sharing_modes.allows_all_reuse = True
    Gemma4UnifiedTextConfig.kv_sharing_modes = property(kv_sharing_modes)


def assistant_config(target):
    from transformers import Gemma4UnifiedAssistantConfig

    text = target.config.text_config
    return Gemma4UnifiedAssistantConfig(
        text_config=dict(
            model_type="gemma4_unified_text", hidden_size=96, intermediate_size=384, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
            global_head_dim=GLOBAL_HEAD_DIM, num_global_key_value_heads=1, attention_k_eq_v=True,
            vocab_size=text.vocab_size, sliding_window=text.sliding_window, layer_types=[SLIDING, FULL],
            num_kv_shared_layers=2, max_position_embeddings=text.max_position_embeddings,
            pad_token_id=0, eos_token_id=1, bos_token_id=2,
        ),
        backbone_hidden_size=text.hidden_size,
    )


def token_stream(tokenizer, texts: list):
    import torch

    ids = []
    for text in texts:
        ids.extend(tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def batches(tokens, batch_size: int, length: int, generator):
    import torch

    while True:
        starts = torch.randint(0, tokens.numel() - length, (batch_size,), generator=generator)
        yield torch.stack([tokens[s:s + length] for s in starts.tolist()])


def learning_rate(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(parameters, loss_of_batch, data, steps: int, peak_lr: float, name: str):
    import torch

    optimizer = torch.optim.AdamW(parameters, lr=peak_lr, weight_decay=0.01, betas=(0.9, 0.95))
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, peak_lr)
        loss = loss_of_batch(next(data))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"{name} step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    return time.perf_counter() - start


def target_outputs(target, input_ids):
    """Final hidden states, logits and the keys/values of the last sliding and last full layer."""
    language_model = target.model.language_model
    output = language_model(input_ids=input_ids, return_shared_kv_states=True, use_cache=False)
    return output.last_hidden_state, target.lm_head_logits(output.last_hidden_state), dict(output.shared_kv_states)


def softcapped_logits(target, hidden):
    logits = target.lm_head(hidden)
    cap = target.config.text_config.final_logit_softcapping
    return logits if cap is None else cap * (logits / cap).tanh()


def store_last_kv_of_each_kind(target):
    """The assistant reads the target's keys and values of its last sliding and last full layer. A target with no
    kv-shared layers stores none (the reference stores only when sharing is on), so ask those two layers to."""
    kinds = target.config.text_config.layer_types
    for kind in set(kinds):
        index = len(kinds) - 1 - kinds[::-1].index(kind)
        target.model.language_model.layers[index].self_attn.store_full_length_kv = True
    target.lm_head_logits = lambda hidden: softcapped_logits(target, hidden)


def assistant_masks(query_positions, key_length: int, window: int):
    """Query at position p (drafting from the target state at p - 1) sees keys up to p - 1; on sliding layers only
    the last `window` + 1 of them, as the reference's flipped bidirectional window does."""
    import torch

    keys = torch.arange(key_length)[None, :]
    last_key = (query_positions - 1)[:, None]
    full = keys <= last_key
    sliding = full & (keys >= last_key - window)
    return {FULL: full[None, None], SLIDING: sliding[None, None]}


def assistant_step(assistant, inputs, positions, shared_kv, masks):
    """One draft step for many positions at once: (projected state, logits)."""
    hidden = assistant.pre_projection(inputs)
    output = assistant.model(inputs_embeds=hidden, attention_mask=masks, position_ids=positions,
                             shared_kv_states=dict(shared_kv), use_cache=False)
    return assistant.post_projection(output.last_hidden_state), assistant.lm_head(output.last_hidden_state)


def assistant_loss(target, assistant, input_ids, unroll: int):
    """Distil the target's next-token distributions into `unroll` chained draft steps from every position t: step i
    predicts token t + 1 + i from the embedding of token t + i and the previous state (the target's at step 1)."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        hidden, logits, shared_kv = target_outputs(target, input_ids)
        greedy = logits.argmax(-1)
    length = input_ids.shape[1]
    queries = length - unroll  # positions t = 0 .. length - unroll - 1
    positions = torch.arange(1, queries + 1)
    masks = assistant_masks(positions, length, assistant.config.text_config.sliding_window)
    embed = target.model.language_model.embed_tokens
    state, token = hidden[:, :queries], input_ids[:, 1:queries + 1]
    loss = 0.0
    for step in range(unroll):
        inputs = torch.cat([embed(token), state], dim=-1)
        state, draft_logits = assistant_step(assistant, inputs, positions[None], shared_kv, masks)
        teacher = logits[:, step + 1:step + 1 + queries].float()
        loss = loss + F.kl_div(F.log_softmax(draft_logits.float(), -1), F.log_softmax(teacher, -1),
                               log_target=True, reduction="batchmean") / queries
        token = greedy[:, step + 1:step + 1 + queries]
    return loss / unroll


def held_out_perplexity(target, tokens, length: int, most_windows=None) -> float:
    import torch
    import torch.nn.functional as F

    windows = tokens[: (tokens.numel() // length) * length].reshape(-1, length)[:most_windows]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, windows.shape[0], 8):
            batch = windows[start:start + 8]
            logits = target(input_ids=batch).logits[:, :-1]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


def draft(target, assistant, sequence, count: int) -> list:
    """`count` greedy drafts after `sequence` (1-D), as the reference's candidate generator makes them."""
    import torch

    hidden, _, shared_kv = target_outputs(target, sequence[None, :-1])
    position = torch.tensor([[sequence.numel() - 1]])
    masks = assistant_masks(position[0], sequence.numel() - 1, assistant.config.text_config.sliding_window)
    state, token, drafts = hidden[:, -1:], sequence[None, -1:], []
    for _ in range(count):
        inputs = torch.cat([target.model.language_model.embed_tokens(token), state], dim=-1)
        state, logits = assistant_step(assistant, inputs, position, shared_kv, masks)
        token = logits.argmax(-1)
        drafts.append(token.item())
    return drafts


def acceptance(target, assistant, tokens, prompts: int, prompt_length: int = 96, new_tokens: int = 64) -> dict:
    """Greedy speculative decoding, simulated with whole-sequence target passes: drafts accepted / drafts made."""
    import torch

    accepted = proposed = passes = 0
    stride = max(1, (tokens.numel() - prompt_length) // prompts)
    with torch.no_grad():
        for index in range(prompts):
            sequence, produced = tokens[index * stride:index * stride + prompt_length], 0
            while produced < new_tokens:
                drafts = draft(target, assistant, sequence, ACCEPTANCE_DRAFT_TOKENS)
                candidate = torch.cat([sequence, torch.tensor(drafts)])
                greedy = target(input_ids=candidate[None]).logits[0, sequence.numel() - 1:].argmax(-1).tolist()
                run = 0
                while run < len(drafts) and drafts[run] == greedy[run]:
                    run += 1
                accepted, proposed, passes = accepted + run, proposed + len(drafts), passes + 1
                sequence = torch.cat([sequence, torch.tensor(greedy[:run + 1])])
                produced += run + 1
    return {"acceptance_rate": accepted / proposed, "tokens_per_target_pass": (accepted + passes) / passes,
            "draft_tokens": ACCEPTANCE_DRAFT_TOKENS, "prompts": prompts}


def save(model, tokenizer, folder: Path, generation: dict):
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))


def main(argv=None):
    args = parse_args(argv)
    import torch
    from transformers import Gemma4UnifiedAssistantForCausalLM, Gemma4UnifiedForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    for part in ("target", "assistant"):
        (staging / part).mkdir(parents=True)
    began = time.perf_counter()

    train_texts, held_out_texts = stdlib_texts(args.seed, args.corpus_megabytes)
    tokenizer = train_tokenizer(train_texts, staging / "target", args.vocab_size, args.seed)
    train_tokens, held_out_tokens = token_stream(tokenizer, train_texts), token_stream(tokenizer, held_out_texts)
    print(f"corpus: {train_tokens.numel():,} training tokens, {held_out_tokens.numel():,} held out", flush=True)

    config = target_config(tokenizer.get_vocab(), args.vocab_size)
    config.text_config._attn_implementation = "sdpa"
    target = Gemma4UnifiedForConditionalGeneration(config)
    generator = torch.Generator().manual_seed(args.seed)
    data = batches(train_tokens, args.batch_size, args.seq_len, generator)

    def target_loss(batch):
        logits = target(input_ids=batch).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))

    target.train()
    target_seconds = train_loop(list(target.parameters()), target_loss, data, args.target_steps, args.learning_rate,
                                "target")
    target.eval().requires_grad_(False)
    perplexity = held_out_perplexity(target, held_out_tokens, args.seq_len, args.perplexity_windows)
    print(f"target held-out perplexity {perplexity:.2f}", flush=True)

    allow_all_reuse_layers()
    store_last_kv_of_each_kind(target)
    assistant = Gemma4UnifiedAssistantForCausalLM(assistant_config(target))
    assistant.config.text_config._attn_implementation = "sdpa"
    assistant.train()
    assistant_data = batches(train_tokens, args.assistant_batch_size, args.seq_len, generator)
    assistant_seconds = train_loop([p for p in assistant.parameters() if p.requires_grad],
                                   lambda batch: assistant_loss(target, assistant, batch, args.assistant_unroll),
                                   assistant_data, args.assistant_steps, args.learning_rate, "assistant")
    assistant.eval()
    measured = acceptance(target, assistant, held_out_tokens, args.eval_prompts)
    print(f"assistant acceptance {measured['acceptance_rate']:.3f}, "
          f"{measured['tokens_per_target_pass']:.2f} tokens per target pass", flush=True)

    generation = {"eos_token_id": [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")],
                  "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id}
    save(target, tokenizer, staging / "target", generation)
    save(assistant, tokenizer, staging / "assistant", dict(generation, num_assistant_tokens=4))
    report = dict(
        vars(args), target_parameters=sum(p.numel() for p in target.parameters()),
        assistant_parameters=sum(p.numel() for p in assistant.parameters()),
        training_tokens=train_tokens.numel(), held_out_tokens=held_out_tokens.numel(),
        target_seconds=round(target_seconds, 1), assistant_seconds=round(assistant_seconds, 1),
        total_seconds=round(time.perf_counter() - began, 1), cpu_seconds=round(time.process_time(), 1),
        held_out_perplexity=round(perplexity, 3), python=sys.version.split()[0], torch=torch.__version__, **measured,
    )
    (staging / "training_report.json").write_text(json.dumps(report, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
