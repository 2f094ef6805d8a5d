"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero."""


class UserInputError(Exception):
    """Bad input from the user (a path, a file's content, an option). The message names the
    thing and the reason, on one line, e.g. ``shards/000003.tar: truncated (ends at byte 81920)``.
    """

    exit_code = 2


def one_line(message: str) -> str:
    """The message a user sees: one line, never a traceback.

    An exception re-raised from a DataLoader worker carries the worker's whole traceback in its
    message ("Caught X in DataLoader worker process 0. Original Traceback ... X: the reason");
    only the final reason is kept. Torch's advice to retry a load with ``weights_only=False`` is
    dropped: it would tell a user to unpickle an untrusted file.
    """
    text = str(message)
    if "Original Traceback" in text or "Traceback (most recent call last)" in text:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = lines[-1] if lines else text
        head, sep, rest = text.partition(": ")
        if sep and head.replace(".", "").replace("_", "").isalnum() and head.split(".")[-1][:1].isupper():
            text = rest  # "ShardReadError: shards/x.tar: ..." -> "shards/x.tar: ..."
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    text = " ".join(lines)
    cuts = [text.find(marker) for marker in ("This file can still be loaded", "weights_only", "Weights only load failed") if marker in text]
    if cuts:  # everything from torch's explanation on goes, whichever of its phrases comes first
        text = text[: min(cuts)].rstrip(" (,;:.`") + " (refused: not a plain weights file)"
    return text
