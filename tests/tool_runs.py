"""A tool's ``main(argv)`` run inside the test process or a pooled rank, without an interpreter
start-up per call."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import sys
from pathlib import Path


def tool_main(script: str, argvs: list[list[str]]) -> list[tuple[int, str, str]]:
    """Run a command-line script's ``main(argv)`` here once per argv, as its ``sys.exit(main())``
    line would (exit code, stdout, stderr): the tool's own argument parser and exit codes without
    an interpreter start-up each. Meant for pooled ranks (``run_on_ranks(tool_main, 1, ...)``)."""
    path = Path(script)
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    saved = {key: os.environ.get(key) for key in ("MMPO_NO_PROGRESS",)}
    os.environ["MMPO_NO_PROGRESS"] = "1"
    results = []
    try:
        for argv in argvs:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    code = module.main(list(argv))
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 1
            results.append((code, out.getvalue(), err.getvalue()))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return results

