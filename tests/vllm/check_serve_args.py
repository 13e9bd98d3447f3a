"""`vllm serve` command lines through vLLM's own parser and start-up checks, starting
nothing: stdin is a JSON list of argv (the words after `vllm serve`); argv[1] names the
file that gets a JSON list of {"ok", "stage", "error", "stand_ins"}, one per command.

The check is the product's own (`disagg launch --check`, src/launch/preflight/
check_serve.py): vLLM's CLI parser, `validate_parsed_serve_args`, then
`ServeSubcommand.cmd`, which makes the load-balancing and headless decisions and raises
the errors users see ("api_server_count can't be set in headless mode",
"data_parallel_hybrid_lb is not applicable in headless mode", ...), stopping where
processes would start. This harness adds stand-ins, so the guides' commands can be
checked on this machine:

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

os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")

_spec = importlib.util.spec_from_file_location(
    "check_serve", os.path.join(os.path.dirname(__file__), "..", "..", "src", "launch", "preflight", "check_serve.py")
)
check_serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_serve)

from vllm.config.model import ModelConfig  # noqa: E402

MODEL = os.environ["DISAGG_CHECK_MODEL"]
# Flags of the guides that vLLM 0.32 no longer has (it refuses them): flag -> takes a value.
REMOVED = {"--swap-space": True}
ModelConfig.is_moe = property(lambda self: True)


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
    result = check_serve.run([MODEL] + argv[1:])
    result.pop("note", None)
    result["stand_ins"] = made
    return result


def main():
    commands = json.load(sys.stdin)
    results = [check(argv) for argv in commands]
    with open(sys.argv[1], "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
