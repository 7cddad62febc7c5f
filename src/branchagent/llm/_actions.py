"""Actions: turn a completion into a change on a branch.

Each is an async function ``action(branch, completion, **options)`` usable as
``solve(..., apply=action)`` (bind options with :func:`functools.partial`).
Any callable ``apply(branch, completion)``, sync or async, stands in the same
place. An action that cannot do what the completion asks raises
:class:`~branchagent.llm.ApplyError`, which fails that candidate only.

- :func:`apply_diff`: apply the unified diff the completion holds.
- :func:`write_code_blocks`: write its fenced code blocks to the files they name
  (with ``path=``: a lone unnamed block goes there).
- :func:`write_file`: write its one code block (or, with none, its whole text) to a path.
- :func:`run_command`: run the shell command it returns, in the branch.
- :func:`apply_auto`: a diff if there is one, else named code blocks.

Every path comes from the model: it must be relative, without ``..``, and it
goes through ``branch.resolve``, so a completion can neither write nor patch a
file outside its branch (``..``, absolute paths, symlinks pointing out).

Picking one block for a path (:func:`write_file`, and :func:`write_code_blocks`
with ``path=`` when no block names a file) follows one rule, :func:`pick_code_block`:
the only block, else the block that names that very path, else the only block
whose language fits the path's extension (``python`` for ``.py``, ...); when
that leaves none or several, the candidate is refused with the count.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import anyio.to_thread
import attrs

from .._branch import Branch
from .._limits import Limits
from ..exceptions import PathEscapeError
from ._completion import Completion
from ._diff import apply_hunks, looks_like_diff, parse_unified_diff
from ._errors import ApplyError

__all__ = [
    "Apply",
    "CodeBlock",
    "apply_auto",
    "apply_diff",
    "extract_command",
    "check_relative_path",
    "parse_code_blocks",
    "pick_code_block",
    "run_command",
    "write_code_blocks",
    "write_file",
]

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_FILE_MARKER = re.compile(
    r"^\s*(?:#|//|--|;+|%|<!--|/\*)\s*(?:file(?:name)?|path)\s*:\s*(?P<path>\S+?)\s*(?:-->|\*/)?\s*$",
    re.IGNORECASE,
)
_ATTR = re.compile(r"""^(?:file|filename|path|title)=["']?(?P<path>[^"']+)["']?$""", re.IGNORECASE)
_PATHLIKE = re.compile(r"^[\w.-]*[/.][\w./-]*\w$")
_SHELL_LANGS = {"", "sh", "bash", "shell", "console", "zsh", "shell-session"}
_DIFF_LANGS = {"diff", "patch", "udiff"}


@attrs.frozen
class CodeBlock:
    """A fenced block: its info string, language, the file it names (if any), its code."""

    info: str
    lang: str | None
    path: str | None
    code: str


def _path_from_info(info: str) -> tuple[str | None, str | None]:
    """``(lang, path)`` of a fence info string: ``python a/b.py``, ``a/b.py``, ``py file=x``."""
    words = info.split()
    if not words:
        return None, None
    lang: str | None = None
    path: str | None = None
    rest = words
    if not _PATHLIKE.match(words[0]) and not _ATTR.match(words[0]):
        lang, rest = words[0], words[1:]
    for word in rest:
        m = _ATTR.match(word)
        if m:
            path = m.group("path")
        elif path is None and _PATHLIKE.match(word):
            path = word
    if lang is None and path is None:
        lang = words[0]
    return lang, path


def parse_code_blocks(text: str) -> list[CodeBlock]:
    """The fenced code blocks of ``text``, in order.

    A block names its file in the fence's info string (```` ```python src/app.py ````,
    ```` ```src/app.py ````, ```` ```python title="src/app.py" ````) or on its first
    line (``# file: src/app.py``, ``// file: ...``, ``<!-- file: ... -->``; that
    line is dropped from the code). A block that is not closed runs to the end
    of the text (models get cut off).
    """
    lines = text.splitlines(keepends=True)
    blocks: list[CodeBlock] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i].rstrip("\r\n"))
        if m is None or (m.group("fence")[0] == "`" and "`" in m.group("info")):
            i += 1
            continue
        fence, indent, info = m.group("fence"), len(m.group("indent")), m.group("info").strip()
        body: list[str] = []
        i += 1
        while i < len(lines):
            line = lines[i]
            stripped = line.strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                i += 1
                break
            if indent and line[:indent].isspace():
                line = line[indent:]
            body.append(line)
            i += 1
        lang, path = _path_from_info(info)
        if path is None and body:
            marker = _FILE_MARKER.match(body[0].rstrip("\r\n"))
            if marker is not None:
                path = marker.group("path")
                body = body[1:]
        code = "".join(body)
        if code and not code.endswith("\n"):
            code += "\n"
        blocks.append(CodeBlock(info=info, lang=lang, path=path, code=code))
    return blocks


#: Languages a fence may name for a file extension (beyond the extension itself).
_LANGS_OF_EXT: dict[str, frozenset[str]] = {
    ext: frozenset(langs) for ext, langs in {
        "py": {"python", "python3", "py", "py3"},
        "pyi": {"python", "python3", "py", "pyi"},
        "js": {"javascript", "js", "node", "jsx"},
        "mjs": {"javascript", "js", "node"},
        "ts": {"typescript", "ts"},
        "tsx": {"typescript", "tsx"},
        "sh": {"sh", "bash", "shell", "zsh"},
        "bash": {"sh", "bash", "shell"},
        "rs": {"rust", "rs"},
        "go": {"go", "golang"},
        "c": {"c"},
        "h": {"c", "cpp", "c++"},
        "cc": {"cpp", "c++", "cc"},
        "cpp": {"cpp", "c++"},
        "hpp": {"cpp", "c++"},
        "java": {"java"},
        "kt": {"kotlin", "kt"},
        "rb": {"ruby", "rb"},
        "json": {"json"},
        "yaml": {"yaml", "yml"},
        "yml": {"yaml", "yml"},
        "toml": {"toml"},
        "md": {"markdown", "md"},
        "html": {"html"},
        "css": {"css"},
        "sql": {"sql"},
        "txt": {"text", "txt", "plaintext", "plain"},
    }.items()
}


def check_relative_path(path: str) -> str:
    """``path`` itself when it is relative and has no ``..`` part; else :class:`PathEscapeError`.

    The lexical half of the rule for paths a model (or an ``--apply`` option)
    names; ``branch.resolve`` then catches symlinks that point out.
    """
    if not path or "\x00" in path:
        raise PathEscapeError(f"path {path!r} is empty or contains NUL")
    if path.startswith("/"):
        raise PathEscapeError(f"path {path!r} is absolute; name it relative to the workspace root")
    if ".." in path.split("/"):
        raise PathEscapeError(f"path {path!r} has a '..' part; name it from the workspace root "
                              "without '..'")
    return path


def _resolve(branch: Branch, path: str, what: str) -> Path:
    try:
        return branch.resolve(check_relative_path(path))
    except PathEscapeError as exc:
        raise ApplyError(f"{what} names {path!r}, which is outside the branch: {exc}") from exc


def _check_file_path(branch: Branch, path: str, what: str) -> Path:
    target = _resolve(branch, path, what)
    if target == Path(os.path.realpath(branch.path)):
        raise ApplyError(f"{what} names {path!r}, the branch's root directory, not a file")
    return target


def _write(target: Path, code: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise ApplyError(f"{target} is a directory")
    target.write_text(code, encoding="utf-8")


def _fits(block: CodeBlock, ext: str) -> bool:
    lang = (block.lang or "").lower()
    return bool(lang) and bool(ext) and (lang == ext or lang in _LANGS_OF_EXT.get(ext, ()))


def pick_code_block(blocks: list[CodeBlock], path: str, *, what: str = "completion",
                    kind: str = "") -> CodeBlock | None:
    """The one block of ``blocks`` to write to ``path`` (``None``: there is no block).

    The rule: the only block; else the last block that names ``path`` itself;
    else the only block whose language fits ``path``'s extension
    (```` ```python ```` for ``calc.py``; see the module docstring). When that
    leaves none or several, :class:`~branchagent.llm.ApplyError` says how many
    blocks there were and how many fit. ``what`` and ``kind`` word that message.
    """
    if not blocks:
        return None
    if len(blocks) == 1:
        return blocks[0]
    same = [b for b in blocks
            if b.path is not None and b.path.removeprefix("./") == path.removeprefix("./")]
    if same:
        return same[-1]
    ext = PurePosixPath(path).suffix.lstrip(".").lower()
    fitting = [b for b in blocks if _fits(b, ext)]
    if len(fitting) == 1:
        return fitting[0]
    langs = ", ".join(b.lang or "untagged" for b in blocks)
    raise ApplyError(
        f"{what} has {len(blocks)} {kind}fenced code blocks ({langs}) and {len(fitting)} "
        f"tagged with a language that fits {path!r}; exactly one is needed to write "
        f"{path!r}: ask the model for a single code block, or name the file in each block"
    )


async def write_code_blocks(
    branch: Branch, completion: Completion, *, path: str | None = None
) -> list[str]:
    """Write each fenced code block that names a file to that file in ``branch``.

    With ``path``, a completion whose blocks name no file has one of them
    written to ``path``, picked by :func:`pick_code_block` (the only block, or
    the only one whose language fits the extension). Later blocks for the same
    file win. Returns the paths written. Raises
    :class:`~branchagent.llm.ApplyError`, and writes nothing, when there is
    nothing to write, the pick is ambiguous, or a block names a path that is
    absolute, has ``..`` or leads outside the branch.
    """
    blocks = parse_code_blocks(completion.text)
    named = [b for b in blocks if b.path is not None]
    if not named:
        if path is None or not blocks:
            hint = (f"; exactly one is needed to write {path!r}" if path is not None else
                    " (write ```python path/to/file.py, or a '# file: path' first line)")
            raise ApplyError(
                f"completion {completion.index} has {len(blocks)} fenced code block(s) and "
                f"none names a file{hint}"
            )
        picked = pick_code_block(blocks, path, what=f"completion {completion.index}",
                                 kind="unnamed ")
        assert picked is not None
        named = [attrs.evolve(picked, path=path)]

    def write_all() -> list[str]:  # path checks follow symlinks: off the loop as well
        files: dict[Path, tuple[str, str]] = {}
        for number, block in enumerate(named, 1):
            assert block.path is not None
            target = _check_file_path(branch, block.path, f"code block {number}")
            files[target] = (block.path, block.code)
        for target, (_, code) in files.items():
            _write(target, code)
        return [shown for shown, _ in files.values()]

    return await anyio.to_thread.run_sync(write_all)


async def write_file(branch: Branch, completion: Completion, *, path: str) -> list[str]:
    """Write the completion's code to ``path`` in ``branch``: what ``--apply file:PATH`` does.

    Its one fenced code block when it has one (the fences, and the prose
    around them, are left out); its whole text when it has none; when it has
    several, the block :func:`pick_code_block` picks (the one naming ``path``,
    or the only one whose language fits ``path``'s extension), else
    :class:`~branchagent.llm.ApplyError` naming the count, and nothing is
    written. ``path`` must be relative, without ``..``. Returns ``[path]``.
    """
    block = pick_code_block(parse_code_blocks(completion.text), path,
                            what=f"completion {completion.index}")
    code = completion.text if block is None else block.code

    def check_and_write() -> None:
        _write(_check_file_path(branch, path, "the apply mode"), code)

    await anyio.to_thread.run_sync(check_and_write)
    return [path]


def _diff_text(text: str) -> str:
    """The diff in the text: bare, or in ```diff fences (the parser skips fence lines and prose).

    Fences indented as list items are read through :func:`parse_code_blocks`,
    which removes their indentation.
    """
    if looks_like_diff(text):
        return text
    fenced = [b.code for b in parse_code_blocks(text) if (b.lang or "").lower() in _DIFF_LANGS]
    return "".join(fenced) if fenced else text


async def apply_diff(branch: Branch, completion: Completion) -> list[str]:
    """Apply the unified diff in the completion (inside ```diff fences, or bare) to ``branch``.

    Accepts ``git diff`` output and ``diff -u`` output (``a/``/``b/`` prefixes
    are dropped when both sides use them), new files (``--- /dev/null``),
    deletions (``+++ /dev/null``) and renames. Hunks are placed by their
    context, tolerating wrong line numbers and counts (see
    :func:`~branchagent.llm.parse_unified_diff`). All files are patched or
    none: a hunk that does not apply raises :class:`~branchagent.llm.ApplyError`
    naming the hunk and the file before anything is written. Returns the
    paths changed.
    """
    patches = parse_unified_diff(_diff_text(completion.text))

    def patch_all() -> list[str]:
        targets = []
        for fp in patches:
            old = _check_file_path(branch, fp.old_path, "the diff") if fp.old_path else None
            new = _check_file_path(branch, fp.new_path, "the diff") if fp.new_path else None
            targets.append((fp, old, new))
        contents: dict[Path, str | None] = {}  # None: deleted

        def current(p: Path, shown: str) -> str:
            if p in contents:
                text = contents[p]
                if text is None:
                    raise ApplyError(f"the diff patches {shown}, which it deleted earlier")
                return text
            try:
                return p.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise ApplyError(f"the diff patches {shown}, which does not exist") from None
            except IsADirectoryError:
                raise ApplyError(f"the diff patches {shown}, which is a directory") from None

        for fp, old, new in targets:
            if old is None:
                assert new is not None
                assert fp.new_path is not None
                if (new in contents and contents[new] is not None) or (
                    new not in contents and new.exists()
                ):
                    raise ApplyError(f"the diff creates {fp.new_path}, which already exists")
                base = ""
            else:
                assert fp.old_path is not None
                base = current(old, fp.old_path)
            result = apply_hunks(base, fp)
            if new is None:
                assert old is not None
                if result.strip():
                    raise ApplyError(
                        f"the diff deletes {fp.old_path} but leaves {len(result)} characters in it"
                    )
                contents[old] = None
            else:
                if old is not None and old != new:
                    contents[old] = None  # a rename
                contents[new] = result
        for p, text in contents.items():
            if text is None:
                p.unlink(missing_ok=True)
            else:
                _write(p, text)
        return sorted({fp.path for fp, _, _ in targets})

    return await anyio.to_thread.run_sync(patch_all)


def extract_command(text: str) -> str:
    """The shell command a completion returns: its first shell-fenced block, else the whole text.

    Blocks tagged ``sh``/``bash``/``shell``/``console`` (or untagged) count;
    ``$ `` prompts at line starts are dropped. Raises
    :class:`~branchagent.llm.ApplyError` when nothing is left.
    """
    blocks = [b for b in parse_code_blocks(text) if (b.lang or "").lower() in _SHELL_LANGS]
    raw = blocks[0].code if blocks else text
    lines = [line[2:] if line.startswith("$ ") else line for line in raw.strip().splitlines()]
    command = "\n".join(lines).strip()
    if not command:
        raise ApplyError("the completion returns no command")
    return command


async def run_command(
    branch: Branch,
    completion: Completion,
    *,
    shell: str = "/bin/sh",
    limits: Limits | None = None,
    timeout: float | None = 60.0,
    isolate: bool = True,
) -> str:
    """Run the shell command the completion returns (:func:`extract_command`) in ``branch``.

    It runs through ``branch.run([shell, "-c", command], ...)``, with the
    branch's isolation and ``limits``; ``timeout`` seconds bound it. A command
    that exits non-zero or is killed raises :class:`~branchagent.llm.ApplyError`
    with its exit status and the end of its stderr. Returns its stdout.
    """
    command = extract_command(completion.text)
    r = await branch.run([shell, "-c", command], limits=limits, isolate=isolate, timeout=timeout)
    if not r.ok:
        why = f"was killed ({r.killed})" if r.killed else f"exited with status {r.returncode}"
        tail = r.stderr.strip()[-2000:]
        raise ApplyError(
            f"the command {command[:200]!r} {why}" + (f": {tail}" if tail else "")
        )
    return r.stdout


async def apply_auto(branch: Branch, completion: Completion) -> list[str]:
    """:func:`apply_diff` when the completion holds a unified diff, else :func:`write_code_blocks`.

    Never runs a command: pass ``apply=run_command`` for that.
    """
    text = _diff_text(completion.text)
    if looks_like_diff(text):
        return await apply_diff(branch, completion)
    if any(b.path is not None for b in parse_code_blocks(completion.text)):
        return await write_code_blocks(branch, completion)
    raise ApplyError(
        f"completion {completion.index} holds neither a unified diff nor a fenced code "
        "block naming a file"
    )


Apply = Callable[[Branch, Completion], object]
"""What ``solve(apply=...)`` takes: ``apply(branch, completion)``, sync or async."""
