"""pam_common: the torch-free module the three layers share (combination names, coded errors, atomic writes)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pam_common import (
    CodedError,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    canonical_combination,
    combination_name,
    split_combination,
)

ROOT = Path(__file__).resolve().parent.parent


def test_imports_without_torch_pydantic_or_any_layer() -> None:
    # torch and pydantic are made unimportable (None in sys.modules), then every helper is used.
    code = (
        "import sys, tempfile, pathlib\n"
        "sys.modules['torch'] = None; sys.modules['pydantic'] = None; sys.modules['numpy'] = None\n"
        "import pam_common as c\n"
        "assert c.combination_name(['parity', 'digit']) == 'digit+parity'\n"
        "assert c.split_combination('a,b+c') == ['a', 'b', 'c']\n"
        "assert c.canonical_combination('c a,a', ['a', 'c']) == ('a', 'c')\n"
        "assert str(c.CodedError('x', 'y')) == '[x] y'\n"
        "p = pathlib.Path(tempfile.mkdtemp()) / 'f.json'; c.atomic_write_json(p, {'a': 1})\n"
        "assert p.read_text() == '{\\n  \"a\": 1\\n}\\n'\n"
        "layers = sorted(m for m in sys.modules if m.split('.')[0] in ('merging', 'mobile_export', 'service'))\n"
        "print(layers)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 0, out.stderr[-800:]
    assert out.stdout.strip() == "[]"


def test_combination_name_is_sorted_distinct_and_split_accepts_every_written_form() -> None:
    assert combination_name(["parity", "digit", "parity"]) == "digit+parity"
    assert combination_name(("loop",)) == "loop"
    for text in ("digit,parity", "parity+digit", "digit parity", " digit ,, +parity ", "digit\tparity"):
        assert sorted(split_combination(text)) == ["digit", "parity"], text
    assert split_combination("b,a") == ["b", "a"]  # order as written: callers decide what to do with it
    assert split_combination(" , + ") == []
    assert combination_name(split_combination("parity+digit")) == "digit+parity"


def test_every_layer_uses_the_one_naming_and_splitting() -> None:
    from merging.tasks import canonical_combination
    from merging.tasks import combination_name as merging_name
    from service.combinations import split_tasks

    assert merging_name is combination_name
    assert canonical_combination("parity digit", ["digit", "parity"]) == ("digit", "parity")
    assert split_tasks("digit parity") == split_combination("digit parity")


def test_one_combination_validation_reports_in_each_layers_error_type() -> None:
    from merging.errors import MergingError
    from merging.tasks import canonical_combination as merging_canonical
    from mobile_export.errors import ExportError
    from mobile_export.manifest import Manifest, TaskEntry

    known = ["digit", "parity"]
    manifest = Manifest.model_construct(tasks=[TaskEntry(name=n, kind="classes", labels=["0", "1"]) for n in known])
    assert canonical_combination("parity,digit+parity", known) == ("digit", "parity")
    assert merging_canonical(["parity", " digit "], known) == ("digit", "parity")
    assert manifest.canonical("parity digit parity") == ["digit", "parity"]
    assert manifest.canonical(None) == known
    for bad, code in (("", "empty_combination"), (" , + ", "empty_combination"), ("digit+age", "unknown_task"),
                      (["age", "zz"], "unknown_task")):
        errors = []
        for call, kind in ((lambda b: canonical_combination(b, known), CodedError),
                           (lambda b: merging_canonical(b, known), MergingError),
                           (lambda b: manifest.canonical(b), ExportError)):
            with pytest.raises(kind) as e:
                call(bad)
            assert type(e.value) is kind and e.value.code == code, (bad, kind)
            errors.append(e.value.message)
        assert len(set(errors)) == 1, errors  # one rule, one wording, in every layer
    # the rule is written once: neither layer keeps its own copy of it
    for path in ("merging/tasks.py", "mobile_export/manifest.py"):
        assert '"empty_combination"' not in (ROOT / path).read_text(), path


def test_every_layer_error_is_a_coded_error_with_the_same_shape() -> None:
    from merging.errors import MergingError
    from mobile_export.errors import ExportError
    from service.errors import ServiceError

    errors: list[CodedError] = [
        MergingError("bad_task", "task t"),
        ExportError("bad_task", "task t"),
        ServiceError(404, "bad_task", "task t", extra={"valid_tasks": ["a"]}),
    ]
    for e in errors:
        assert isinstance(e, CodedError) and isinstance(e, Exception)
        assert (e.code, e.message, str(e)) == ("bad_task", "task t", "[bad_task] task t")
        assert e.args == ("task t",)
        # they cross process pools intact (the default reduce would call cls(message) and fail)
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and back.__dict__ == e.__dict__ and str(back) == str(e)
    service_error = errors[2]
    assert isinstance(service_error, ServiceError)
    assert service_error.status == 404 and service_error.body() == {"error": "bad_task", "detail": "task t",
                                                                     "valid_tasks": ["a"]}
    with pytest.raises(MergingError, match=re.escape("[bad_task] task t")):
        raise errors[0]


def test_atomic_writes_replace_whole_files_create_parents_and_leave_no_temporaries(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(str(target), b"new")
    assert target.read_bytes() == b"new"
    atomic_write_text(tmp_path / "t.txt", "héllo")
    assert (tmp_path / "t.txt").read_bytes() == "héllo".encode()
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2]})
    text = (tmp_path / "j.json").read_text()
    assert text.endswith("\n") and list(json.loads(text)) == ["b", "a"]  # key order kept
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path: Path) -> None:
    target = tmp_path / "keep.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"v": object()})  # not JSON-serialisable: fails before any write
    with pytest.raises(TypeError):
        atomic_write_bytes(target, "not bytes")  # type: ignore[arg-type]  # fails inside the write
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]


def test_packaging_ships_the_module_and_the_image_copies_it() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "pam_common*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert "pam_common" in pyproject["tool"]["mypy"]["packages"]
    copies = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("COPY ")]
    for pkg in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pkg.rstrip("*") in copies, f"the Dockerfile does not copy {pkg.rstrip('*')}"
