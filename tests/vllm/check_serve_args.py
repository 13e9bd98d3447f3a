"""`vllm serve` command lines through vLLM's own parser and start-up checks, starting
nothing: stdin is a JSON list of argv (the words after `vllm serve`); argv[1] names the
file that gets a JSON list of {"ok", "stage", "error", "stand_ins"}, one per command.

Each command runs `vllm serve`'s real code path: vLLM's CLI parser (FlexibleArgumentParser
with serve's arguments, so `_`/`-`, dotted `--x.y` and JSON flags as vLLM takes them),
`validate_parsed_serve_args`, then `ServeSubcommand.cmd`, which makes the load-balancing
and headless decisions and raises the errors users see ("api_server_count can't be set in
headless mode", "data_parallel_hybrid_lb is not applicable in headless mode", ...). Where
that code would start processes, the engine configuration is built instead
(`AsyncEngineArgs.create_engine_config`, with its DP checks) and the run stops.

The guides' models and hardware are not here, so stand-ins are made and reported per
command (`stand_ins`): the local tiny model replaces the model (argv[0]), marked MoE as
the guides' DeepSeek models are (vLLM refuses external DP for dense models);
VLLM_ALLOW_LONG_MAX_MODEL_LEN lets their context lengths pass; tensor and pipeline
parallel sizes become 1 (the tiny model has 4 heads, the machine no GPUs); a connector
from a plug-in that is not installed (vllm-ascend's) becomes NixlConnector, and keys
vLLM's KVTransferConfig no longer has are dropped; flags vLLM has removed since the
guides were written (REMOVED) are dropped. What stays is what the launcher
decides: the DP layout flags, headless, API-server counts, ports, every other flag.
"""

import importlib.util
import json
import os
import sys
import types

os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import vllm  # noqa: E402
import vllm.entrypoints.cli.serve as serve  # noqa: E402
from vllm.config.model import ModelConfig  # noqa: E402
from vllm.entrypoints.launchers.cli_args import make_arg_parser, validate_parsed_serve_args  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402
from vllm.utils.argparse_utils import FlexibleArgumentParser  # noqa: E402

MODEL = os.environ["DISAGG_CHECK_MODEL"]
# Flags of the guides that vLLM 0.32 no longer has (it refuses them): flag -> takes a value.
REMOVED = {"--swap-space": True}
ModelConfig.is_moe = property(lambda self: True)


class Started(Exception):
    """vLLM got as far as starting its processes."""


def engine_config(args, headless):
    engine_args = vllm.AsyncEngineArgs.from_cli_args(args)
    engine_args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER, headless=headless)


current = {}


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


serve.run_multi_api_server = api_servers
serve.run_dp_supervisor = api_servers
serve.uvloop = types.SimpleNamespace(run=one_api_server)
serve.CoreEngineProcManager = EngineProcs


def stand_ins(argv):
    """The command with what this machine lacks replaced, and what was replaced."""
    from vllm.config.kv_transfer import KVTransferConfig

    out, made = [], []
    i = 0
    while i < len(argv):
        a = argv[i]
        name = a.split("=", 1)[0].replace("_", "-")
        if name in ("--tensor-parallel-size", "--pipeline-parallel-size", "-tp", "-pp") and i + 1 < len(argv):
            if argv[i + 1] != "1":
                made.append(f"{name} {argv[i + 1]} -> 1")
            out += [a, "1"]
            i += 2
            continue
        if name in REMOVED:
            takes = REMOVED[name] and "=" not in a
            made.append(f"{name} dropped (vLLM 0.32 has no such flag)")
            i += 2 if takes else 1
            continue
        if name == "--kv-transfer-config" and i + 1 < len(argv):
            kv = json.loads(argv[i + 1])
            module = kv.get("kv_connector_module_path")
            if module and importlib.util.find_spec(module.split(".")[0]) is None:
                made.append(f"kv_connector {kv['kv_connector']} ({module}, not installed) -> NixlConnector")
                kv["kv_connector"] = "NixlConnector"
                del kv["kv_connector_module_path"]
            for key in list(kv):
                if key not in KVTransferConfig.__dataclass_fields__:
                    made.append(f"kv_transfer_config.{key} dropped (not in vLLM's KVTransferConfig)")
                    del kv[key]
            out += [a, json.dumps(kv)]
            i += 2
            continue
        out.append(a)
        i += 1
    return out, made


def check(argv):
    argv, made = stand_ins(argv)
    result = run(argv)
    result["stand_ins"] = made
    return result


def run(argv):
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))

    def refuse(message):
        raise ValueError(message)

    parser.error = refuse
    try:
        args = parser.parse_args([MODEL] + argv[1:])
    except (ValueError, SystemExit) as e:
        return {"ok": False, "stage": "parse", "error": str(e)}
    current["args"] = args
    try:
        validate_parsed_serve_args(args)
        serve.ServeSubcommand.cmd(args)
        return {"ok": False, "stage": "run", "error": "returned without starting"}
    except Started as s:
        return {"ok": True, "stage": str(s), "error": None}
    except Exception as e:  # noqa: BLE001 - vLLM's own errors are the result
        return {"ok": False, "stage": "checks", "error": f"{type(e).__name__}: {e}"}


def main():
    commands = json.load(sys.stdin)
    results = [check(argv) for argv in commands]
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
