"""`vllm bench serve`, run many times from one Python process: each line of stdin is a
JSON list of the words after `vllm bench serve`; each run goes through vLLM's own parser
(`vllm.benchmarks.serve.add_cli_args`) and entry point (`main`), as the CLI's `serve`
subcommand calls them (vllm/entrypoints/cli/benchmark/serve.py), and ends with the line
`@@done <exit code>` on stdout. vLLM is imported once, not once per run: on this 2-core
machine the import is most of a short run's time (tests/vllm/bench_compare.rs). Standard
error is standard output, so a failed run's traceback and vLLM's own messages come before
its `@@done` line, where the test shows them.
"""

import json
import os
import sys
import traceback

os.dup2(1, 2)

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

for line in sys.stdin:
    argv = json.loads(line)
    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    try:
        main(parser.parse_args(argv))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except Exception:
        traceback.print_exc()
        code = 1
    sys.stderr.flush()
    print(f"@@done {code}", flush=True)
