"""Load a model and its processor from a local folder or a Hugging Face Hub repo id (safetensors only)."""

from pathlib import Path
from typing import Optional, Union

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig
from .decoder import fuse_projections
from .errors import Gemma4Error
from .json_files import read_json
from .model import Model
from .processor import Processor
from .quantized_layers import use_few_row_products

WEIGHTS_INDEX = "model.safetensors.index.json"
# What a snapshot needs: never pickled weights. The model card is read for its licence when converting.
HUB_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt", "README.md"]
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def resolve_model_path(path_or_repo: Union[str, Path]) -> Path:
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_repo)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise Gemma4Error(f"model not found: {text} is not a folder and not a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(text, allow_patterns=HUB_FILES))
    except RepositoryNotFoundError:
        raise Gemma4Error(f"model not found on the Hub: {text}") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Gemma4Error(f"could not fetch {text} from the Hub (offline or unreachable?): {reason}") from None


def weight_files(model_path: Path) -> list:
    """The safetensors files of a checkpoint: those its index names, or every one in the folder. Never pickles."""
    index_path = model_path / WEIGHTS_INDEX
    if index_path.exists():
        names = sorted(set(read_json(index_path).get("weight_map", {}).values()))
        pickled = [name for name in names if name.endswith(PICKLED_SUFFIXES)]
        if pickled:
            raise Gemma4Error(f"{model_path}: {WEIGHTS_INDEX} names pickled weights ({pickled[0]}); only safetensors are read")
        missing = [name for name in names if not (model_path / name).is_file()]
        if missing:
            raise Gemma4Error(f"{model_path}: shard {missing[0]} named by {WEIGHTS_INDEX} is missing")
        files = [model_path / name for name in names]
    else:
        files = sorted(model_path.glob("*.safetensors"))
    if not files:
        pickled = sorted(p.name for p in model_path.iterdir() if p.suffix in PICKLED_SUFFIXES)
        hint = f" (found {pickled[0]}: pickled weights are never loaded; convert to safetensors)" if pickled else ""
        raise Gemma4Error(f"no .safetensors weights in {model_path}{hint}")
    return files


def read_weights(files: list) -> dict:
    weights = {}
    for file in files:
        try:
            weights.update(mx.load(str(file)))
        except (RuntimeError, ValueError, OSError) as error:
            raise Gemma4Error(f"corrupt or truncated weights file {file}: {error}") from None
    return weights


def quantize_like_checkpoint(model: nn.Module, quantization: dict, weights: dict):
    """Quantize exactly the layers the checkpoint stores quantized, with per-layer overrides (mixed recipes)."""

    def predicate(path, module):
        if f"{path}.scales" not in weights:
            return False
        override = quantization.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(
        model,
        group_size=quantization["group_size"],
        bits=quantization["bits"],
        mode=quantization.get("mode", "affine"),
        class_predicate=predicate,
    )


def load_weights(module: nn.Module, model_path: Path, quantization: Optional[dict], dtype: Optional[str]):
    """Fill `module` (a Model or a Drafter: anything with `sanitize`) from the folder's safetensors, strictly."""
    weights = module.sanitize(read_weights(weight_files(model_path)))
    if quantization:
        quantize_like_checkpoint(module, quantization, weights)
    if dtype is not None:
        target = DTYPES[dtype]
        weights = {k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()}
    try:
        module.load_weights(list(weights.items()), strict=True)
    except ValueError as error:
        raise Gemma4Error(f"weights in {model_path} do not fit the config: {str(error).splitlines()[0]}") from None
    mx.eval(module.parameters())
    fuse_projections(module)
    use_few_row_products(module)
    module.eval()
    return module


def check_dtype(dtype: Optional[str]):
    if dtype is not None and dtype not in DTYPES:
        raise Gemma4Error(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")


def load_model(model_path: Path, dtype: Optional[str] = None) -> Model:
    config_dict = read_json(model_path / "config.json")
    config = ModelConfig.from_dict(config_dict)
    config.quantization = config_dict.get("quantization")
    return load_weights(Model(config), model_path, config.quantization, dtype)


def load(path_or_repo: Union[str, Path], dtype: Optional[str] = None):
    """`model, processor = load("google/gemma-4-12B-it")`, or a local folder; `dtype` casts floating weights."""
    check_dtype(dtype)
    model_path = resolve_model_path(path_or_repo)
    model = load_model(model_path, dtype)
    processor = Processor.from_folder(model_path, model.config)
    return model, processor
