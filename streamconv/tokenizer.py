"""The SentencePiece tokenizer a `.nemo` ships: its vocabulary size, and the files transformers loads it from.

GPT-SW3's tokenizer is a SentencePiece model; transformers' `GPTSw3Tokenizer` reads it as `spiece.model`,
and `AutoTokenizer.from_pretrained(folder)` finds that class through `tokenizer_config.json`. Reading the
model needs the `sentencepiece` package (the `tokenizer` extra); without it the file is still copied, but
neither its vocabulary size nor the tokenizer can be checked.

A Hugging Face tokenizer's files (NeMo 2.0's) are untrusted data: refused before they are copied or loaded
if they name a file, a module or code, or hold more entries than a real tokenizer (`check_hf_files`). Every
load check runs in a child process (`LoadCheck`), which a timeout or a stopped run kills.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import time

from streamconv.errors import ConversionError, describe, first_line

MODEL_FILE = "spiece.model"
CONFIG_FILE = "tokenizer_config.json"
MAX_BYTES = 256 * 2**20  # GPT-SW3's tokenizer is about 1 MB
# A Hugging Face tokenizer's files (`save_pretrained`), the ones a conversion copies; a Llama model's, as NeMo 2.0
# ships them. Code (tokenization_*.py) is never among them.
HF_MAX_BYTES = 48 * 2**20  # each of them: Llama 3's tokenizer.json is 9 MB; parsing JSON takes some 20 x its size
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")
# Counts a loader handles in seconds (a Llama 3 tokenizer.json: 128k vocabulary, 280k merges, 256 added tokens,
# loads in 2 s); `AutoTokenizer` is quadratic in the special tokens listed in tokenizer_config.json (4096: 4 s).
MAX_VOCAB, MAX_MERGES, MAX_ADDED, MAX_SPECIAL = 2**20, 2**21, 2**16, 2**12
UNCHECKED = f"tokenizer copied as {MODEL_FILE} but not checked (install streamconv[tokenizer], i.e. sentencepiece, " \
    "to check it)"
LOAD_SECONDS = 120  # the load check's limit (a Llama 3 tokenizer: a few seconds, transformers' import included)
# The keys of tokenizer_config.json and special_tokens_map.json copied as they are: transformers hands every key
# to the `__init__` of the class `tokenizer_class` names, and across its classes dozens of keys name a file
# (vocab_file, spm_file, gguf_file, tokenizer_file, ...), remote code (auto_map) or a loader option, new ones
# with each release. So what is known to be plain data is kept, and any other key refused (a tokenizer edited
# to drop it would be another tokenizer). Besides these: `*_token`, a special token.
SAFE_KEYS = frozenset({
    "added_tokens_decoder", "additional_special_tokens", "extra_special_tokens", "chat_template", "tokenizer_class",
    "model_input_names", "model_max_length", "padding_side", "truncation_side", "clean_up_tokenization_spaces",
    "split_special_tokens", "add_bos_token", "add_eos_token", "add_prefix_space", "legacy", "errors", "do_lower_case",
    "strip_accents", "tokenize_chinese_chars", "trim_offsets", "use_default_system_prompt",
    "spaces_between_special_tokens", "extra_ids", "keep_accents", "remove_space", "sp_model_kwargs",
    "processor_class", "backend", "is_local", "local_files_only"})  # (the last three: transformers 5 writes them)
# Keys outside SAFE_KEYS said to name a file, a module, code or a loader option (the others are refused as
# unknown: only the message differs); a `*_token` key matching them is no special token.
_CODE_OR_FILE = re.compile(r"auto_map|remote|code|module|class|init_inputs|name_or_path|revision|cache|proxies|"
                           r"subfolder|auth|gguf|_files?$|_path$|_dir$|_spm$|_dic$|_option$|kwargs$")
_TOKEN_FIELDS = frozenset({"content", "lstrip", "rstrip", "normalized", "single_word", "special", "__type"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}")
# transformers resolves tokenizer_class by name among all its classes: `LlamaForCausalLM` would build the model
_TOKENIZER_CLASS = re.compile(r"[A-Za-z0-9_]{0,90}(?:Tokenizer(?:Fast)?|TokenizersBackend)")


def sentencepiece_available() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True


def vocab_size(model: bytes) -> int | None:
    """The number of pieces in a SentencePiece model; None without the sentencepiece package or for a
    file it cannot read (the conversion then falls back to --vocab-size or GPT-SW3's 64000)."""
    return _pieces(model) if sentencepiece_available() else None


@functools.lru_cache(maxsize=4)  # asked for the plan, the summary and the copy: the model is parsed once
def _pieces(model: bytes) -> int | None:
    import sentencepiece

    try:
        return int(sentencepiece.SentencePieceProcessor(model_proto=model).vocab_size())
    except (RuntimeError, OSError, ValueError):
        return None


@functools.lru_cache(maxsize=4)  # (asked for the plan and the summary: parsed once)
def _hf_vocab_size(tokenizer_json: bytes) -> int | None:
    try:
        data = json.loads(tokenizer_json)
        ids = [*data["model"]["vocab"].values(), *(t["id"] for t in data.get("added_tokens") or [])]
        return 1 + max(i for i in ids if isinstance(i, int) and not isinstance(i, bool))
    except (KeyError, TypeError, ValueError, AttributeError, RecursionError):
        return None


def hf_vocab_size(files: dict[str, bytes]) -> int | None:
    """The vocabulary of a Hugging Face tokenizer: one more than the largest id in its `tokenizer.json` (model
    vocabulary and added tokens); None without one that reads."""
    return _hf_vocab_size(files["tokenizer.json"]) if "tokenizer.json" in files else None


def check_hf_files(files: dict[str, bytes], where: str) -> None:
    """Refuse, before they are copied or loaded, Hugging Face tokenizer files (in folder `where`) that name
    anything outside themselves (see SAFE_KEYS) or hold more entries than a real tokenizer."""
    for name, data in files.items():
        if name == "tokenizer.model":  # a SentencePiece model: read by sentencepiece alone, its size bounded
            continue
        try:
            content = json.loads(data)
        except (ValueError, RecursionError):
            content = None
        if not isinstance(content, dict):
            problem = "not a JSON object"
        else:
            problem = _tokenizer_json_problem(content) if name == "tokenizer.json" else _settings_problem(content)
        if problem:
            raise ConversionError(f"{where}/{name}: {problem}; streamconv copies a tokenizer only if it is plain "
                                  "data of a real tokenizer's size: fix or remove that file in the checkpoint")


def _tokenizer_json_problem(content: dict) -> str | None:
    """What makes a `tokenizer.json` too large to load in bounded time (the tokenizers library, which parses it,
    opens no file it names)."""
    model = content.get("model") if isinstance(content.get("model"), dict) else {}
    for what, items, limit in (("vocabulary entries", model.get("vocab"), MAX_VOCAB),
                               ("merges", model.get("merges"), MAX_MERGES),
                               ("added tokens", content.get("added_tokens"), MAX_ADDED)):
        if isinstance(items, (list, dict)) and len(items) > limit:
            return f"{len(items)} {what}, more than {limit}"
    return None


def _settings_problem(content: dict) -> str | None:
    """What in `tokenizer_config.json` or `special_tokens_map.json` is not plain data of a known key."""
    for key, value in content.items():
        special = key not in SAFE_KEYS and key.endswith("_token") and _NAME.fullmatch(key) is not None \
            and not _CODE_OR_FILE.search(key)
        if not special and key not in SAFE_KEYS:
            why = "names a file, a module, code or a loader option" if _CODE_OR_FILE.search(key) \
                else "is not one streamconv knows to be plain data"
            return f"the key {describe(key)} {why}"
        if key in ("added_tokens_decoder", "additional_special_tokens", "extra_special_tokens"):
            limit = MAX_ADDED if key == "added_tokens_decoder" else MAX_SPECIAL
            if isinstance(value, (list, dict)) and len(value) > limit:
                return f"{describe(key)} holds {len(value)} tokens, more than {limit}"
        if not _plain(key, value, special):
            return f"the key {describe(key)} holds {describe(value)}, not what a tokenizer saves there"
    return None


def _plain(key: str, value: object, special: bool) -> bool:
    """Whether `value` is what transformers saves under `key`: data that names no file, class or option."""
    if special:
        return value is None or isinstance(value, str) or _added_token(value)
    if key == "added_tokens_decoder":  # id -> token
        return isinstance(value, dict) and all(i.isdigit() and len(i) < 10 and _added_token(token)
                                               for i, token in value.items())
    if key in ("additional_special_tokens", "extra_special_tokens"):  # a list, or names (attributes) -> tokens
        names = value.keys() if isinstance(value, dict) else ()
        tokens = value.values() if isinstance(value, dict) else value
        return isinstance(value, (list, dict)) and all(isinstance(t, str) or _added_token(t) for t in tokens) \
            and all(name.endswith("_token") and _NAME.fullmatch(name) for name in names)
    if key == "chat_template":  # a Jinja template, run later by transformers in its sandbox: data
        return isinstance(value, str) or isinstance(value, list) and all(
            isinstance(t, dict) and set(t) == {"name", "template"} and all(isinstance(v, str) for v in t.values())
            for t in value)
    if key == "tokenizer_class":  # looked up by name among transformers' classes: a tokenizer's, never a model's
        return value is None or isinstance(value, str) and _TOKENIZER_CLASS.fullmatch(value) is not None
    if key == "processor_class":  # (recorded for processors; AutoTokenizer does not load it)
        return value is None or isinstance(value, str) and _NAME.fullmatch(value) is not None
    if key == "model_input_names":
        return isinstance(value, list) and all(isinstance(name, str) for name in value)
    if key == "sp_model_kwargs":  # SentencePiece's options, among them a model file to load
        return value == {}
    return value is None or isinstance(value, (bool, int, float, str))


def _added_token(value: object) -> bool:
    """An `AddedToken` as transformers saves it: its text and flags."""
    return isinstance(value, dict) and isinstance(value.get("content"), str) and set(value) <= _TOKEN_FIELDS \
        and all(isinstance(v, (bool, str)) for v in value.values())


def check_hf(folder: str, config: dict) -> str:
    """Load the copied Hugging Face tokenizer as a user would and compare its size with the model's."""
    from transformers import AutoTokenizer

    try:
        loaded = AutoTokenizer.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except BaseException as exc:  # whatever a damaged file makes the library raise, the tokenizers library's
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):  # panics too (PanicException is no Exception)
            raise
        return f"tokenizer files copied but they do not load ({first_line(exc)[:300]})"
    name, size = type(loaded).__name__, len(loaded)
    if size > config["vocab_size"]:
        return f"tokenizer files copied: {name} of {size} tokens, more than the model's {config['vocab_size']}"
    return f"tokenizer files copied and checked: {name} of {size} tokens"


def save(folder: str, model: bytes, settings: dict) -> None:
    """Write `spiece.model` and its `tokenizer_config.json` (`settings`: what the model's family says of its class,
    length and special tokens)."""
    with open(os.path.join(folder, MODEL_FILE), "wb") as f:
        f.write(model)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(settings, f, indent=2)
        f.write("\n")


def check(folder: str, config: dict) -> str:
    """Load the saved tokenizer as a user would, compare it with the model's config, and say so in a note."""
    if not sentencepiece_available():
        return UNCHECKED
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # a damaged model file fails inside sentencepiece or transformers
        return f"tokenizer copied as {MODEL_FILE} but it does not load ({first_line(exc)})"
    name, size = type(tokenizer).__name__, len(tokenizer)
    if size != config["vocab_size"]:
        return (f"tokenizer copied as {MODEL_FILE}: {name} of {size} tokens, but the model's vocabulary is "
                f"{config['vocab_size']}; check --vocab-size")
    ids = {key: tokenizer.convert_tokens_to_ids(getattr(tokenizer, key)) for key in ("bos_token", "eos_token",
                                                                                     "pad_token")}
    wrong = [f"{key} {getattr(tokenizer, key)!r} is id {ids[key]}, config.json says {config[key + '_id']}"
             for key in ids if ids[key] != config[key + "_id"]]
    if wrong:
        return f"tokenizer copied as {MODEL_FILE}: {name}, but " + "; ".join(wrong)
    return f"tokenizer copied as {MODEL_FILE} and checked: {name} of {size} tokens"


_CHILD = "import sys; sys.path[:] = sys.argv[5:]; from streamconv.tokenizer import _child; _child(*sys.argv[1:5])"


class LoadCheck:
    """A load check (`kind` "sentencepiece": `check`; "hf": `check_hf`) in a child process, so that a tokenizer
    which hangs, panics or fills the loader's memory costs the child, not the run: after LOAD_SECONDS it is killed
    and the note says the tokenizer was not checked; a run stopped (Ctrl-C, SIGTERM) kills it at once."""

    def __init__(self, kind: str, folder: str, config: dict) -> None:
        self.deadline = time.monotonic() + LOAD_SECONDS
        # A part's staged folder is reached through its descriptor (/proc/self/fd/N/...): the child gets descriptor N
        held = folder.split("/")[4] if folder.startswith("/proc/self/fd/") else None
        self.process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, kind, folder, json.dumps(config), str(LOAD_SECONDS + 5), *sys.path],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"}, pass_fds=(int(held),) if held else ())

    def result(self) -> str:
        """The check's note, waited for until the deadline at most."""
        try:
            out, _ = self.process.communicate(timeout=max(0.0, self.deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.stop()
            return f"tokenizer files copied but not checked: loading them took over {LOAD_SECONDS} s"
        note, code = out.decode(errors="replace").strip(), self.process.returncode
        if code or not note or "\n" in note:
            ended = f"signal {-code}" if code < 0 else f"exit code {code}"
            return f"tokenizer files copied but not checked: the load check ended with {ended}"
        return note

    def stop(self) -> None:
        """Kill the check if it still runs, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


def _child(kind: str, folder: str, config: str, seconds: str) -> None:
    """The child's side of LoadCheck: the note on stdout, and nothing else there (the loader's messages go to
    stderr, which the parent discards)."""
    signal.alarm(int(seconds))  # (ends the child even if the run that started it was killed)
    note = os.dup(1)
    os.dup2(2, 1)
    os.write(note, {"hf": check_hf, "sentencepiece": check}[kind](folder, json.loads(config)).encode())
