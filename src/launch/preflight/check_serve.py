"""`disagg launch --check`: `vllm serve` command lines through the installed vLLM's own
parser and start-up checks, starting nothing.

stdin: a JSON list of {"argv": [the words after `vllm serve`], "env": {NAME: value}}.
argv[1]: the file that gets {"vllm": VERSION, "results": [{"ok", "stage", "error",
"note"}, ...]}, one result per command.

Each command takes `vllm serve`'s real code path: vLLM's CLI parser (FlexibleArgumentParser
with serve's arguments: `_`/`-`, dotted `--x.y` and JSON flags as vLLM takes them), then
`validate_parsed_serve_args`, then -- where the model's configuration is on this machine
(a local folder, or in the Hugging Face cache) -- `ServeSubcommand.cmd`, which makes the
load-balancing and headless decisions and raises the errors users see; where that code
would start processes, the engine configuration is built instead
(`AsyncEngineArgs.create_engine_config`, with its DP checks) and the check stops. Where
the model is not here, the command is parsed and validated only, and the note says so.
The hooks are taken only where this vLLM has them (else: parsed and validated only).
"""

import json
import os
import sys
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vllm  # noqa: E402
import vllm.entrypoints.cli.serve as serve  # noqa: E402
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402


class Started(Exception):
    """vLLM got as far as starting its processes."""


current = {}


def engine_config(args, headless):
    engine_args = vllm.AsyncEngineArgs.from_cli_args(args)
    engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=headless)


def api_servers(args):
    engine_config(args, False)
    raise Started("api-server")


def one_api_server(coro):
    coro.close()
    engine_config(current["args"], False)
    raise Started("api-server")


class EngineProcs:
    def __init__(self, *a, **k):
        raise Started("headless")


HOOKS = ("run_multi_api_server", "run_dp_supervisor", "uvloop", "CoreEngineProcManager")
HOOKED = all(hasattr(serve, name) for name in HOOKS)
if HOOKED:
    serve.run_multi_api_server = api_servers
    serve.run_dp_supervisor = api_servers
    serve.uvloop = types.SimpleNamespace(run=one_api_server)
    serve.CoreEngineProcManager = EngineProcs


def model_here(model):
    """The model's configuration is on this machine (a folder, or the HF cache)."""
    if os.path.isdir(model):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "config.json"), str)
    except Exception:  # noqa: BLE001 - not resolvable here is the answer
        return False


def run(argv):
    """One command (argv from the model on): {"ok", "stage", "error", "note"}."""
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))

    def refuse(message):
        raise ValueError(message)

    parser.error = refuse
    try:
        args = parser.parse_args(argv)
    except (ValueError, SystemExit) as e:
        return {"ok": False, "stage": "parse", "error": str(e), "note": None}
    current["args"] = args
    try:
        validate_parsed_serve_args(args)
    except Exception as e:  # noqa: BLE001 - vLLM's own errors are the result
        return {"ok": False, "stage": "validate", "error": f"{type(e).__name__}: {e}", "note": None}
    if not HOOKED:
        return {"ok": True, "stage": "validate", "error": None, "note": f"vLLM {vllm.__version__} has not the start-up hooks this check knows: parsed and validated only"}
    model = getattr(args, "model_tag", None) or args.model
    if not model_here(model):
        return {"ok": True, "stage": "validate", "error": None, "note": f"the model {model} is not on this machine: parsed and validated only"}
    try:
        serve.ServeSubcommand.cmd(args)
        return {"ok": False, "stage": "run", "error": "returned without starting", "note": None}
    except Started as s:
        return {"ok": True, "stage": str(s), "error": None, "note": None}
    except Exception as e:  # noqa: BLE001 - vLLM's own errors are the result
        return {"ok": False, "stage": "checks", "error": f"{type(e).__name__}: {e}", "note": None}


def check(argv, env):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return run(argv)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main():
    commands = json.load(sys.stdin)
    results = [check(c["argv"], c.get("env", {})) for c in commands]
    with open(sys.argv[1], "w") as f:
        json.dump({"vllm": vllm.__version__, "results": results}, f)


if __name__ == "__main__":
    main()
