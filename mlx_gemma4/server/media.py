"""The bytes behind a message's image, audio and video parts. `data:` URLs always; a local file or an http(s) URL only
when the operator turned it on, since either lets a client make the server read a file or reach a host (SSRF)."""

import base64
import binascii
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import Gemma4Error

DEFAULT_MAX_MEDIA_BYTES = 32 * 1024 * 1024
REMOTE_TIMEOUT_SECONDS = 10


@dataclass(frozen=True)
class MediaPolicy:
    max_bytes: int = DEFAULT_MAX_MEDIA_BYTES
    allow_local_files: bool = False
    allow_remote_urls: bool = False


def decode_base64(data: str, what: str, policy: MediaPolicy) -> bytes:
    if len(data) * 3 // 4 > policy.max_bytes:
        raise Gemma4Error(f"{what} is larger than the server's limit of {policy.max_bytes} bytes")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise Gemma4Error(f"{what} is not valid base64") from None


def url_bytes(url: str, what: str, policy: MediaPolicy) -> bytes:
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise Gemma4Error(f"{what}: a data URL must be base64 (data:<type>;base64,<data>)")
        return decode_base64(data, what, policy)
    if url.startswith(("http://", "https://")):
        if not policy.allow_remote_urls:
            raise Gemma4Error(f"{what}: remote URLs are turned off on this server (--allow-remote-media); "
                              "send the media as a data: URL")
        return fetch_remote(url, what, policy)
    if not policy.allow_local_files:
        raise Gemma4Error(f"{what}: local files are turned off on this server (--allow-local-media); "
                          "send the media as a data: URL")
    path = Path(url.removeprefix("file://")).expanduser()
    if not path.is_file():
        raise Gemma4Error(f"{what}: no such file {path}")
    if path.stat().st_size > policy.max_bytes:
        raise Gemma4Error(f"{what} is larger than the server's limit of {policy.max_bytes} bytes")
    return path.read_bytes()


def fetch_remote(url: str, what: str, policy: MediaPolicy) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_SECONDS) as response:
            data = response.read(policy.max_bytes + 1)
    except OSError as error:
        raise Gemma4Error(f"{what}: cannot fetch {url}: {error}") from None
    if len(data) > policy.max_bytes:
        raise Gemma4Error(f"{what} is larger than the server's limit of {policy.max_bytes} bytes")
    return data


def message_media(messages: list, policy: MediaPolicy) -> dict:
    """{"images": [...], "audio": [...], "video": bytes or None}, in the order the parts appear."""
    media = {"images": [], "audio": [], "video": None}
    for index, message in enumerate(messages):
        if not isinstance(message.content, list):
            continue
        for part in message.content:
            what = f"messages[{index}] {part.type}"
            if part.type == "image_url":
                media["images"].append(url_bytes(part.image_url.url, what, policy))
            elif part.type == "input_audio":
                media["audio"].append(decode_base64(part.input_audio.data, what, policy))
            elif part.type == "video_url":
                if media["video"] is not None:
                    raise Gemma4Error("one video per request")
                media["video"] = url_bytes(part.video_url.url, what, policy)
    return media
