"""Upload a converted folder to the Hugging Face Hub (huggingface_hub shows its own progress bars)."""

from pathlib import Path

from mlx_gemma4.errors import Gemma4Error

REPO_TYPE = "model"


def folder_files(folder: Path) -> list:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def describe_upload(folder: Path, repo_id: str) -> str:
    files = folder_files(folder)
    total = sum(p.stat().st_size for p in files)
    lines = [f"would upload {len(files)} files ({total / 1e9:.2f} GB) from {folder} to https://huggingface.co/{repo_id}:"]
    lines += [f"  {p.relative_to(folder)}  {p.stat().st_size:,} bytes" for p in files]
    return "\n".join(lines)


def commit_message(folder: Path) -> str:
    return f"Upload {folder.name}: Gemma 4 unified converted to MLX with mlx-gemma4"


def network_errors() -> tuple:
    """What huggingface_hub raises when the Hub cannot be reached or refuses: HTTP errors are OSErrors; transport
    errors come from its HTTP client (httpx, or requests in older versions)."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    errors = [HfHubHTTPError, OfflineModeIsEnabled, OSError, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        errors.append(getattr(module, "TransportError", None) or getattr(module, "RequestException"))
    return tuple(errors)


def upload_folder(folder: Path, repo_id: str) -> str:
    """Creates the repo when missing, uploads the folder in one commit; returns the repo URL."""
    from huggingface_hub import HfApi

    if not folder.is_dir():
        raise Gemma4Error(f"nothing to upload: {folder} is not a folder")
    api = HfApi()
    try:
        api.create_repo(repo_id=repo_id, repo_type=REPO_TYPE, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, repo_type=REPO_TYPE, commit_message=commit_message(folder),
            ignore_patterns=[".*"],
        )
    except network_errors() as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise Gemma4Error(f"upload to {repo_id} failed (offline, not logged in, or no access?): {reason}") from None
    return f"https://huggingface.co/{repo_id}"
