#!/usr/bin/env python3
"""Make NIXL's UCX progress-thread delay configurable (default 1000 us instead of 0).

NIXL's Python API hard-codes `pthrDelay = 0`, so every vLLM instance's progress thread
busy-polls a whole core even when idle; a 1P1D pair on a 2-core machine then has no CPU
left for the engines. With a delay, idle CPU drops to ~0 and transfers still work.
The delay is read from NIXL_PTHR_DELAY_US at agent creation (0 restores upstream).

Usage: nixl-idle-patch.py VENV_PYTHON   (patches that venv's nixl in place, idempotent)
"""
import pathlib
import subprocess
import sys

MARK = "# disagg: configurable progress-thread delay"

python = sys.argv[1]
site = subprocess.check_output(
    [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
).strip()
targets = [p for p in pathlib.Path(site).glob("nixl*/_api.py")]
patched = 0
for path in targets:
    src = path.read_text()
    if MARK in src:
        patched += 1
        continue
    lines = src.splitlines(keepends=True)
    out = []
    hit = False
    for line in lines:
        stripped = line.strip()
        if stripped.endswith("pthrDelay = 0") and "=" in stripped:
            indent = line[: len(line) - len(line.lstrip())]
            lhs = stripped.split("=")[0].strip()
            out.append(f"{indent}{MARK}\n")
            out.append(
                f"{indent}{lhs} = int(__import__('os').environ.get('NIXL_PTHR_DELAY_US', '1000'))\n"
            )
            hit = True
        else:
            out.append(line)
    if hit:
        path.write_text("".join(out))
        patched += 1
        print(f"patched {path}")
if patched == 0:
    sys.exit(f"no NIXL _api.py with 'pthrDelay = 0' under {site} (found: {targets}); "
             "the NIXL version changed: re-check the idle-polling fix")
