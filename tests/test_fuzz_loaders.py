"""Property-based fuzzing (hypothesis) of every loader through the CLI's entry point: ``.npz`` files, image
folders, YAML configs and studies, checkpoints and their sidecars, the study store.

For every generated input: exit code 2 with exactly one short ``error:`` line and no traceback (an
uncaught exception fails the test), the input files and the output folder's existing content left as
they were, and the process' peak memory bounded over the whole suite. Inputs that happen to load are
stopped right after loading by an option that is checked only then (``--target 99``, ``--device tpu``,
``attack.target=99``), so nothing trains. Examples are derandomised: the same inputs on every run.

Each test counts the distinct inputs it tried (by content) and checks there were at least 40 of its 50 examples,
so the five loaders get at least 200 between them. Each counts its own: pytest-xdist may run them in different
processes, where a count summed in module state would see only part of them.
"""

from __future__ import annotations

import hashlib
import io
import json
import resource
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import CliResult, invoke_main  # noqa: E402
from test_hardening import MAX_LINE, real_arrays, small_store, snapshot  # noqa: E402

SEEN: dict[str, set[str]] = {}  # loader -> digests of the distinct inputs tried
MIN_DISTINCT = 40  # per loader, of FUZZ's 50 examples
# how far this module may raise the process' peak RSS: a bomb that slips through allocates gigabytes. Relative to
# the peak before the module, since that depends on what ran before it in the same pytest process.
PEAK_GROWTH_MIB = 700
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])


def record(loader: str, *parts: bytes | str) -> None:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    SEEN.setdefault(loader, set()).add(h.hexdigest())


def assert_distinct(loader: str) -> None:
    """The loader's test tried enough different inputs: hypothesis may repeat an example or shrink to one it had."""
    n = len(SEEN.get(loader, ()))
    print(f"distinct {loader} inputs: {n}")
    assert n >= MIN_DISTINCT, f"{loader}: {n} distinct inputs, fewer than {MIN_DISTINCT}"


def check_refused(args: list[str | Path], watched: list[Path], out: Path | None = None, allow_ok: bool = False) -> CliResult:
    """Run the CLI; assert the contract for bad input and that nothing already written changed."""
    before = {p: snapshot(p) if p.is_dir() else p.read_bytes() for p in watched}
    res = invoke_main(*args)
    refused = not (allow_ok and res.returncode == 0)
    if refused:
        line = res.error_line()  # exit 2, one error line, no traceback
        assert len(line) < MAX_LINE, line[:300]
    for p, content in before.items():
        assert (snapshot(p) if p.is_dir() else p.read_bytes()) == content, f"{p} changed"
    if out is not None:
        assert (out / "keep.txt").read_text() == "written before; must survive\n"
        if refused:
            assert sorted(q.name for q in out.iterdir()) == ["keep.txt"], "a refused command wrote into --out"
    return res


def workspace() -> tuple[Path, Path]:
    """A fresh folder and an output folder inside it that already holds someone's file."""
    tmp = Path(tempfile.mkdtemp(prefix="antidoor-fuzz-"))
    out = tmp / "out"
    out.mkdir()
    (out / "keep.txt").write_text("written before; must survive\n")
    return tmp, out


@pytest.fixture(scope="module")
def real(bundled) -> dict[str, np.ndarray]:
    """A small real CIFAR-10 .npz (200 training, 100 test images, every class)."""
    return real_arrays(bundled)


@pytest.fixture(scope="module", autouse=True)
def bounded_memory() -> object:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    yield
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    assert peak - before < PEAK_GROWTH_MIB, f"peak memory {peak} MiB, {peak - before} MiB above the {before} MiB before"


# -- .npz ------------------------------------------------------------------------------------------------

LABEL_VALUES = st.sampled_from([-1, -(2**40), 10_000, 10**6, 10**12, 2**62])
SHAPES = st.lists(st.integers(0, 40), min_size=0, max_size=5).map(tuple)


@st.composite
def npz_inputs(draw: st.DrawFn, real: dict[str, np.ndarray]) -> bytes:
    arrays = {k: v.copy() for k, v in real.items()}
    kind = draw(st.sampled_from(["label", "label_dtype", "label_shape", "image_dtype", "image_shape", "missing", "classes",
                                 "objects", "truncate", "flip", "random", "length"]))
    if kind == "label":
        key = draw(st.sampled_from(["y_train", "y_test"]))
        arrays[key] = arrays[key].astype(np.int64)
        arrays[key][draw(st.integers(0, len(arrays[key]) - 1))] = draw(LABEL_VALUES)
    elif kind == "label_dtype":
        key = draw(st.sampled_from(["y_train", "y_test"]))
        arrays[key] = arrays[key].astype(draw(st.sampled_from([np.float32, np.float64, np.bool_, np.complex64, "U3"])))
    elif kind == "label_shape":
        key = draw(st.sampled_from(["y_train", "y_test"]))
        n = len(arrays[key])
        arrays[key] = draw(st.sampled_from([arrays[key].reshape(n // 2, 2), arrays[key][:0], arrays[key].reshape(1, n),
                                            np.zeros((n, 3), np.int64), np.int64(3)]))
    elif kind == "image_dtype":
        key = draw(st.sampled_from(["x_train", "x_test"]))
        arrays[key] = arrays[key].astype(draw(st.sampled_from([np.float32, np.int16, np.uint16, np.int8])))
    elif kind == "image_shape":
        key = draw(st.sampled_from(["x_train", "x_test"]))
        shape = draw(SHAPES)
        arrays[key] = np.zeros(shape, np.uint8) if np.prod(shape) < 10**6 else np.zeros(1, np.uint8)
    elif kind == "missing":
        for key in draw(st.lists(st.sampled_from(["x_train", "y_train", "x_test", "y_test"]), min_size=1, unique=True)):
            del arrays[key]
    elif kind == "classes":
        arrays["classes"] = draw(st.sampled_from([np.array([]), np.array([["a", "b"]] * 5), np.array(["x"] * 3),
                                                  np.arange(20_000), np.array([1.5] * 10)]))
    elif kind == "objects":
        arrays[draw(st.sampled_from(["x_train", "y_train", "classes"]))] = np.array([{"a": 1}, None], dtype=object)
    elif kind == "length":
        key = draw(st.sampled_from(["y_train", "y_test"]))
        arrays[key] = arrays[key][: draw(st.integers(1, len(arrays[key]) - 1))]
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "flip":  # the zip directory and .npy headers: flips there break the file's structure
        where = draw(st.sampled_from([range(0, 200), range(len(data) - 400, len(data))]))
        for pos in draw(st.lists(st.sampled_from(where), min_size=1, max_size=8)):
            data = data[:pos] + bytes([data[pos] ^ draw(st.integers(1, 255))]) + data[pos + 1:]
    elif kind == "random":
        data = draw(st.binary(min_size=0, max_size=2000))
    return data


def test_fuzz_npz(real: dict[str, np.ndarray]) -> None:
    @FUZZ
    @given(npz_inputs(real))
    def run(data: bytes) -> None:
        record("npz", data)
        tmp, out = workspace()
        try:
            path = tmp / "data.npz"
            path.write_bytes(data)
            check_refused(["attack", "--data", path, "--target", "99", "--model", "small_cnn", "--device", "cpu", "--out", out],
                          [path], out)
        finally:
            shutil.rmtree(tmp)

    run()
    assert_distinct("npz")


# -- image folders -----------------------------------------------------------------------------------------

def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@st.composite
def folder_inputs(draw: st.DrawFn, real: dict[str, np.ndarray]) -> dict[str, bytes]:
    """A folder layout as {relative path: bytes}; real CIFAR-10 images where images are meant to be fine."""
    good = [png_bytes(real["x_train"][i]) for i in range(4)]
    kind = draw(st.sampled_from(["junk", "truncated", "tiny", "sizes", "no_test", "empty_class", "no_images", "no_classes"]))
    files = {"train/cat/0.png": good[0], "train/dog/1.png": good[1], "test/cat/2.png": good[2], "test/dog/3.png": good[3]}
    if kind == "junk":
        files[draw(st.sampled_from(list(files)))] = draw(st.binary(max_size=300))
    elif kind == "truncated":
        key = draw(st.sampled_from(list(files)))
        files[key] = files[key][: draw(st.integers(0, len(files[key]) - 1))]
    elif kind == "tiny":  # every image smaller than the 8-pixel minimum
        side = draw(st.integers(1, 7))
        files = {k: png_bytes(np.ascontiguousarray(real["x_train"][6][:side, :side])) for k in files}
    elif kind == "sizes":
        side = draw(st.integers(8, 31))
        files[draw(st.sampled_from(list(files)))] = png_bytes(np.ascontiguousarray(real["x_train"][5][:side, :side]))
    elif kind == "no_test":
        files = {k: v for k, v in files.items() if k.startswith("train/")}
    elif kind == "empty_class":  # the test split's class folders hold no image
        files = {k: v for k, v in files.items() if k.startswith("train/")} | {"test/cat/x.txt": b"not an image"}
    elif kind == "no_images":
        files = {k.replace(".png", ".txt"): v for k, v in files.items()}
    elif kind == "no_classes":
        files = {"train/a.png": good[0], "test/b.png": good[1]}
    return files


def test_fuzz_image_folders(real: dict[str, np.ndarray]) -> None:
    @FUZZ
    @given(folder_inputs(real))
    def run(files: dict[str, bytes]) -> None:
        record("folder", *[f"{k}={hashlib.sha256(v).hexdigest()}" for k, v in sorted(files.items())])
        tmp, out = workspace()
        try:
            root = tmp / "images"
            for rel, data in files.items():
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(data)
            check_refused(["attack", "--data", root, "--target", "99", "--model", "small_cnn", "--device", "cpu", "--out", out],
                          [root], out)
        finally:
            shutil.rmtree(tmp)

    run()
    assert_distinct("folder")


# -- YAML configs and studies --------------------------------------------------------------------------------

KEYS = st.sampled_from(["name", "data", "model", "attack", "train", "seeds", "datasets", "models", "attacks", "defenses",
                        "pratio", "target", "epochs", "width", "lr", "n_train", "seed", "device", "stress", "ra", "x", "<<"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                    st.text(max_size=30), st.sampled_from(["small_cnn", "badnets", "ft", "cifar10-mini", "../../x", "nan"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
                      max_leaves=20)


@st.composite
def yaml_inputs(draw: st.DrawFn) -> str:
    import yaml

    kind = draw(st.sampled_from(["structured", "structured", "text", "bomb", "deep", "tags"]))
    if kind == "structured":
        doc = draw(st.dictionaries(KEYS, VALUES, min_size=1, max_size=6) | VALUES)
        return yaml.safe_dump(doc, allow_unicode=True)
    if kind == "text":
        return draw(st.text(st.sampled_from(list("ab:-[]{}&*!|>'\"#\n\t %@`,?01.")), max_size=200))
    if kind == "bomb":
        width, levels = draw(st.integers(2, 12)), draw(st.integers(6, 30))
        lines = [f"l0: &l0 [{', '.join(['1'] * width)}]"]
        lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
        return "\n".join([*lines, f"{draw(KEYS)}: *l{levels - 1}", ""])
    if kind == "deep":
        depth = draw(st.integers(200, 5000))
        return "train: " + "[" * depth + "]" * depth + "\n"
    return f"model: !!python/object/apply:os.system [{draw(st.sampled_from(['echo', 'true']))!r}]\n"


def test_fuzz_yaml_configs() -> None:
    @FUZZ
    @given(yaml_inputs(), st.sampled_from(["attack", "grid"]))
    def run(text: str, command: str) -> None:
        record("yaml", command, text)
        tmp, out = workspace()
        try:
            path = tmp / "config.yaml"
            path.write_text(text)
            if command == "attack":
                args = ["attack", "--config", path, "--target", "99", "--set", "data.download=false", "--device", "cpu",
                        "--out", out]
            else:
                args = ["grid", path, "--device", "tpu", "--out", out / "study"]
            check_refused(args, [path], out)
        finally:
            shutil.rmtree(tmp)

    run()
    assert_distinct("yaml")


# -- checkpoints and sidecars --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_checkpoint(real: dict[str, np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict, Path]:
    """A checkpoint (small_cnn, BadNets trigger, recorded splits) whose sidecar names a real .npz."""
    from antidoor.attacks import create_attack
    from antidoor.checkpoint import save_checkpoint
    from antidoor.data import Splits
    from antidoor.models import build_model

    folder = tmp_path_factory.mktemp("fuzz-ckpt")
    npz = folder / "data.npz"
    np.savez(npz, **real)
    attack = create_attack({"name": "badnets", "pratio": 0.1, "target": 0}, (3, 32, 32), 10)
    splits = Splits(torch.arange(0, 8), torch.arange(8, 10), torch.arange(10, 30))
    meta = {"dataset": {"config": {"name": str(npz)}, "image_shape": [3, 32, 32], "n_train": 200}, "seed": 0}
    path = save_checkpoint(folder / "model.safetensors", build_model("small_cnn", 10, 3, width=4), meta, attack, splits)
    return path.read_bytes(), json.loads(path.with_suffix(".json").read_text()), npz


SIDECAR_PATHS = [("arch", "name"), ("arch", "num_classes"), ("arch", "in_channels"), ("arch", "kwargs"), ("arch",), ("mean",),
                 ("std",), ("attack",), ("attack", "name"), ("attack", "target"), ("dataset", "image_shape"),
                 ("dataset", "config"), ("dataset", "config", "name"), ("dataset",), ("dataset", "n_train")]
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


@st.composite
def checkpoint_inputs(draw: st.DrawFn, base: tuple[bytes, dict, Path]) -> tuple[bytes, bytes, str]:
    weights, sidecar, _ = base
    sidecar = json.loads(json.dumps(sidecar))
    suffix = ".safetensors"
    kind = draw(st.sampled_from(["sidecar_value", "sidecar_value", "sidecar_text", "weights_truncate", "weights_header",
                                 "weights_random", "pt_random", "splits"]))
    text = None
    if kind == "sidecar_value":
        *parents, last = draw(st.sampled_from(SIDECAR_PATHS))
        node = sidecar
        for p in parents:
            node = node.setdefault(p, {}) if isinstance(node.get(p), dict) else node
        node[last] = draw(JSON_VALUES)
    elif kind == "sidecar_text":
        text = draw(st.sampled_from(["", "[]", "null", "{", "[" * 100_000, '{"arch": 1}'])) + draw(st.text(max_size=20))
    elif kind == "weights_truncate":
        weights = weights[: draw(st.integers(0, len(weights) - 1))]
    elif kind == "weights_header":  # the safetensors header: a JSON of names, dtypes, shapes and offsets
        n = int.from_bytes(weights[:8], "little")
        header = json.loads(weights[8:8 + n])
        name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        header[name][field] = draw(st.sampled_from(["F64", "I8", "BOOL", "X"]) if field == "dtype"
                                   else st.lists(st.integers(-5, 10**12), max_size=5))
        raw = json.dumps(header).encode()
        weights = len(raw).to_bytes(8, "little") + raw + weights[8 + n:]
    elif kind == "weights_random":
        weights = draw(st.binary(max_size=3000))
    elif kind == "pt_random":
        suffix, weights = ".pt", draw(st.binary(max_size=3000))
    elif kind == "splits":
        from safetensors.torch import load, save

        tensors = load(weights)
        key = draw(st.sampled_from(["split.defender_train", "split.defender_val", "split.poison"]))
        values = draw(st.lists(st.integers(-(2**40), 2**40), max_size=12))
        dtype = draw(st.sampled_from([torch.int64, torch.float32, torch.int32, torch.uint8, torch.bool]))
        tensors[key] = torch.tensor(values, dtype=torch.int64).clamp(-(2**31), 2**31 - 1).to(dtype)
        if draw(st.booleans()):
            tensors[key] = torch.cat([tensors[key], tensors["split.defender_train"].to(dtype)])  # overlaps
        weights = save(tensors, metadata={"format": "antidoor-checkpoint"})
    side = (text if text is not None else json.dumps(sidecar)).encode()
    return weights, side, suffix


def test_fuzz_checkpoints_and_sidecars(base_checkpoint: tuple[bytes, dict, Path]) -> None:
    @FUZZ
    @given(checkpoint_inputs(base_checkpoint), st.sampled_from(["evaluate", "purify"]))
    def run(ckpt: tuple[bytes, bytes, str], command: str) -> None:
        weights, side, suffix = ckpt
        record("checkpoint", command, weights, side, suffix)
        tmp, out = workspace()
        try:
            path = (tmp / "model").with_suffix(suffix)
            path.write_bytes(weights)
            path.with_suffix(".json").write_bytes(side)
            # stopped after loading: the target is no class; FT at lr 1e30 diverges in its second epoch
            extra = (["--set", "attack.target=99"] if command == "evaluate"
                     else ["--defense", "ft", "--set", "defense.epochs=2", "--set", "defense.lr=1e30"])
            check_refused([command, path, *extra, "--device", "cpu", "--out", out], [path, path.with_suffix(".json")], out)
        finally:
            shutil.rmtree(tmp)

    run()
    assert_distinct("checkpoint")


# -- the study store -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_store(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return small_store(tmp_path_factory.mktemp("fuzz-store") / "study").read_bytes()


@st.composite
def store_inputs(draw: st.DrawFn, base: bytes) -> bytes:
    kind = draw(st.sampled_from(["truncate", "flip", "random", "foreign", "schema"]))
    if kind == "truncate":
        return base[: draw(st.integers(0, len(base) - 1))]
    if kind == "flip":
        data = bytearray(base)
        for pos in draw(st.lists(st.integers(0, len(base) - 1), min_size=1, max_size=16)):
            data[pos] ^= draw(st.integers(1, 255))
        return bytes(data)
    if kind == "random":
        return draw(st.binary(max_size=5000))
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "x.sqlite"
        if kind == "foreign":
            with sqlite3.connect(db) as conn:
                for t in draw(st.lists(st.sampled_from(["meta", "runs", "metrics", "artifacts", "people", "t"]),
                                       max_size=3, unique=True)):
                    conn.execute(f"CREATE TABLE {t} (x)")
        else:
            db.write_bytes(base)
            with sqlite3.connect(db) as conn:
                conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (draw(st.sampled_from(["0", "2", ""])),))
        conn.close()
        return db.read_bytes()


def test_fuzz_study_store(base_store: bytes) -> None:
    """A damaged or foreign store: refused with one line (or, where the damage misses every page read, read as
    it is), and in every case left byte-identical."""
    @FUZZ
    @given(store_inputs(base_store), st.sampled_from(["results", "report", "resume"]))
    def run(data: bytes, command: str) -> None:
        record("store", command, data)
        tmp, out = workspace()
        try:
            folder = tmp / "study"
            folder.mkdir()
            (folder / "study.sqlite").write_bytes(data)
            args: dict[str, list[str | Path]] = {
                "results": ["results", folder, "--format", "json"], "report": ["report", folder, "--out", out],
                "resume": ["grid", "--resume", "--out", folder, "--device", "tpu"]}
            check_refused(args[command], [folder], out if command == "report" else None, allow_ok=command != "resume")
        finally:
            shutil.rmtree(tmp)

    run()
    assert_distinct("store")

