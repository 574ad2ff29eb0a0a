"""A file that is not GGUF, or a GGUF file cut off mid-download, is refused in one line that names the
file and the setting to change, for the tokenizer and the weights alike (not the gguf package's bare
"GGUF magic invalid" or a numpy reshape error)."""

from __future__ import annotations

import pytest

from ftcore.config.errors import RunSetupError, run_setup
from ftcore.data.tokenizers.gguf import gguf_tokenizer
from ftcore.models import from_gguf


def _refusal(read) -> str:
    with pytest.raises(RunSetupError) as refused:
        run_setup(read)
    return str(refused.value)


def test_a_file_of_another_format_is_named_with_the_setting(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 a zip archive, not GGUF" * 4)
    message = _refusal(lambda: gguf_tokenizer(str(path)))
    assert "model.gguf is not a readable GGUF file (GGUF magic invalid)" in message
    assert "set the tokenizer path to a whole .gguf file" in message
    assert "set the checkpoint or model path" in _refusal(lambda: from_gguf(str(path)))


def test_a_cut_off_download_is_named(assets, tmp_path):
    whole = (assets / "models" / "stories260K.gguf").read_bytes()
    path = tmp_path / "stories260K.gguf"
    path.write_bytes(whole[: len(whole) // 2])
    message = _refusal(lambda: from_gguf(str(path)))
    assert "stories260K.gguf is not a readable GGUF file" in message and "incomplete download" in message
