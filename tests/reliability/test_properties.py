"""Property-based (hypothesis): whatever the config values, command line or image bytes, the user
never sees a raw traceback: exit 2 and one line on stderr starting with ``metassl: error:``."""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from metassl.cli import main
from metassl.config import _flat_keys, _reference
from metassl.data.errors import CorruptImageError
from metassl.data.folder import load_image

# METASSL_FUZZ_EXAMPLES=500 for a longer, randomised search; CI runs 25 fixed examples per property
_FUZZ = int(os.environ.get("METASSL_FUZZ_EXAMPLES", "0"))
SETTINGS = settings(max_examples=_FUZZ or 25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    derandomize=not _FUZZ, database=None)
KNOWN_KEYS = sorted(_flat_keys(_reference())) + ["method.temperature", "regularizer.name", "data.name", "backbone.name",
                                                 "method", "regularizer", "data", "backbone", "protocol", "paper"]
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
VALUES = st.one_of(
    st.integers(min_value=-10**6, max_value=10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "null", "auto", "[]", "[1,2]", "{a: 1}", "${oc.env:HOME}", "'", "[", "-1", "1e400",
                     "nan", "-inf", "0", "0.0"]),
    TEXT,
)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), TEXT, st.builds("{}.{}".format, st.sampled_from(KNOWN_KEYS), TEXT))


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


def assert_clean(code: int, err: str) -> None:
    assert "Traceback" not in err, err
    if code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (code, err)
        assert len(lines) == 1 and lines[0].startswith("metassl: error:"), err


@SETTINGS
@given(st.lists(st.tuples(KEYS, VALUES), min_size=1, max_size=3))
def test_random_config_overrides(pairs):
    """`metassl config` validates exactly as `metassl train` does before any work."""
    code, err = run_cli(["config", *(f"{k}={v}" for k, v in pairs)])
    assert_clean(code, err)


TOKENS = st.one_of(
    st.sampled_from(["eval", "export", "analyze", "config", "presets", "knn", "linear", "segment", "background", "--ckpt",
                     "--out", "--config", "--compare", "--backbone", "--group-size", "--device", "--precision", "-x",
                     "--", "nope.ckpt", "a=b", "=", "bench", "speed", "train", "metassl"]),
    TEXT,
)


@SETTINGS
@given(st.lists(TOKENS, max_size=6))
def test_random_command_lines(tmp_path, argv):
    if argv[:1] == ["train"] or argv[:2] == ["bench", "speed"]:
        argv = [*argv, "no.such.key=1"] if argv[:1] == ["train"] else argv[:1] + ["nope"]  # never a real run
    argv = [str(tmp_path / a) if a.endswith(".ckpt") else a for a in argv]
    try:
        code, err = run_cli(argv)
    except SystemExit as exit_:  # --help
        assert exit_.code == 0
        return
    assert_clean(code, err)


def _png(rng: np.random.Generator, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@SETTINGS
@given(st.integers(0, 2**32 - 1), st.sampled_from(["truncate", "flip", "garbage", "prefix"]), st.integers(0, 400),
       st.sampled_from(["PNG", "JPEG"]))
def test_malformed_image_bytes(tmp_path, seed, how, where, fmt):
    """A damaged image either decodes to a valid RGB image or raises CorruptImageError naming the file."""
    rng = np.random.default_rng(seed)
    blob = bytearray(_png(rng, fmt))
    where = where % len(blob)
    if how == "truncate":
        blob = blob[:where]
    elif how == "flip":
        blob[where] ^= 0xFF
    elif how == "garbage":
        blob = bytearray(rng.integers(0, 256, where, dtype=np.uint8).tobytes())
    else:
        blob = bytearray(b"\x89PNG\r\n\x1a\n") + blob[where:]
    path = tmp_path / f"img-{seed}-{how}.{fmt.lower()}"
    path.write_bytes(bytes(blob))
    try:
        img = load_image(str(path), 8)
    except CorruptImageError as err:
        assert str(path) in str(err) and "\n" not in str(err)
    else:
        assert img.shape == (3, 8, 8) and str(img.dtype) == "torch.uint8"


def test_malformed_image_in_a_folder_run_is_one_line(tmp_path):
    for split, n in (("train", 8), ("test", 3)):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(n):
                (tmp_path / split / c / f"{i}.png").write_bytes(_png(np.random.default_rng(i)))
    (tmp_path / "train" / "a" / "5.png").write_bytes(_png(np.random.default_rng(5))[:-30])
    code, err = run_cli(["train", "protocol=smoke", "data=imagefolder", f"data.train_dir={tmp_path / 'train'}",
                         f"data.test_dir={tmp_path / 'test'}", "data.image_size=8", f"output_dir={tmp_path / 'run'}"])
    assert code == 2 and "5.png" in err
    assert_clean(code, err)
