"""disagg launch --ray: the Ray side. Reads a plan (JSON) made by `disagg launch`, starts
one actor per instance in a placement group of its own, substitutes {HOST} (the node Ray
chose) and {KV_IP} (the first prefill's node), waits for /health, starts the router on the
head node, and reports JSON events on stdout. Stops everything on SIGTERM/SIGINT or when
any process dies. Uses only Ray's public API.

usage: python ray_driver.py PLAN.json RAY_ADDRESS
"""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def emit(**event):
    print(json.dumps(event), flush=True)


def node_ip():
    me = ray.get_runtime_context().get_node_id()
    for n in ray.nodes():
        if n["NodeID"] == me:
            return n["NodeManagerAddress"]
    return ray.util.get_node_ip_address()


@ray.remote
class Proc:
    """One engine or router process on the node the actor was placed on."""

    def __init__(self, name, argv, env, log_dir):
        self.name, self.argv, self.env, self.log_dir = name, argv, env, log_dir
        self.proc = None

    def start(self, kv_ip, extra_args):
        host = node_ip()
        sub = lambda s: s.replace("{HOST}", host).replace("{KV_IP}", kv_ip or host)
        argv = [sub(a) for a in self.argv] + list(extra_args)
        env = dict(os.environ)
        env.update({k: sub(v) for k, v in self.env.items()})
        os.makedirs(self.log_dir, exist_ok=True)
        log = open(os.path.join(self.log_dir, self.name + ".log"), "wb")
        self.proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        return host

    def gpus(self):
        """The GPUs Ray gave this actor (its whole bundle when it is one)."""
        return [str(g) for g in ray.get_gpu_ids()]

    def poll(self):
        return None if self.proc is None else self.proc.poll()

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=10)
        except Exception:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except Exception:
                pass


def healthy(url, path):
    try:
        with urllib.request.urlopen(url + path, timeout=2) as r:
            return r.status == 200
    except Exception:
        return False


def main():
    plan = json.load(open(sys.argv[1]))
    ray.init(address=sys.argv[2], logging_level="ERROR", log_to_driver=False)
    head = next(n["NodeManagerAddress"] for n in ray.nodes()
                if n["Alive"] and "node:__internal_head__" in n.get("Resources", {}))
    stopping = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stopping.__setitem__("now", True))
    signal.signal(signal.SIGINT, lambda *_: stopping.__setitem__("now", True))
    procs, groups, started = [], [], []

    def stop_all():
        for p in reversed(procs):
            try:
                ray.get(p.stop.remote(), timeout=30)
            except Exception:
                pass
        for g in groups:
            remove_placement_group(g)

    try:
        kv_ip = None
        for inst in plan["instances"]:
            gpus = inst["num_gpus"]
            per = plan["gpus_per_worker"]
            bundles = [{"GPU": per}] * (gpus // per) if gpus else [{"CPU": 0.01}]
            pg = placement_group(bundles)
            ray.get(pg.ready(), timeout=plan["timeout"])
            groups.append(pg)
            strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=0,
                                                        placement_group_capture_child_tasks=True)
            actor = Proc.options(num_cpus=0, num_gpus=per if gpus and len(bundles) == 1 else 0,
                                 scheduling_strategy=strategy, name=plan["job"] + "-" + inst["name"]).remote(
                inst["name"], inst["argv"], inst["env"], plan["log_dir"])
            procs.append(actor)
            host = ray.get(actor.start.remote(kv_ip, []))
            if kv_ip is None and inst["role"] == "prefill":
                kv_ip = host
            url = "http://%s:%d" % (host, inst["port"])
            started.append((inst["name"], inst["role"], url))
            emit(event="instance", name=inst["name"], role=inst["role"], host=host, url=url,
                 gpus=ray.get(actor.gpus.remote()))

        deadline = time.time() + plan["timeout"]
        pending = dict((name, url) for name, _, url in started)
        while pending:
            if stopping["now"]:
                return 0
            for i, p in enumerate(procs):
                rc = ray.get(p.poll.remote())
                if rc is not None:
                    emit(event="failed", name=started[i][0], status=rc)
                    return 2
            for name, url in list(pending.items()):
                if healthy(url, "/health"):
                    del pending[name]
                    emit(event="healthy", name=name)
            if time.time() > deadline:
                emit(event="timeout", pending=sorted(pending))
                return 2
            time.sleep(0.5)

        r = plan["router"]
        prefill = [u for _, role, u in started if role == "prefill"]
        decode = [u for _, role, u in started if role == "decode"]
        if r["command"] is not None:
            cmd = r["command"].replace("{PORT}", str(r["port"]))
            for name, urls in (("PREFILL", prefill), ("DECODE", decode)):
                for idx in range(len(urls), 0, -1):
                    u = urls[idx - 1]
                    host, port = u.replace("http://", "").rsplit(":", 1)
                    for k, v in (("HOST", host), ("PORT", port), ("URL", u)):
                        cmd = cmd.replace("${%s_%s_%d}" % (name, k, idx), v).replace("$%s_%s_%d" % (name, k, idx), v)
            import shlex
            argv, extra = shlex.split(cmd), []
        else:
            argv = r["base"]
            url_of = dict((name, u) for name, _, u in started)
            extra = []
            for w in r["workers"]:
                extra += [w["flag"], url_of[w["instance"]]] + ([str(w["bootstrap"])] if w["bootstrap"] is not None else [])
            extra += r["tail"]
        router = Proc.options(num_cpus=0, resources={"node:" + head: 0.001}, name=plan["job"] + "-router").remote(
            "router", argv, {}, plan["log_dir"])
        procs.append(router)
        started.append(("router", "router", "http://%s:%d" % (head, r["port"])))
        host = ray.get(router.start.remote(kv_ip, extra))
        url = "http://%s:%d" % (host, r["port"])
        deadline = time.time() + plan["timeout"]
        while not healthy(url, "/health" if r["command"] is None else "/"):
            if r["command"] is not None:
                import socket
                try:
                    socket.create_connection((host, r["port"]), timeout=1).close()
                    break
                except OSError:
                    pass
            if ray.get(router.poll.remote()) is not None:
                emit(event="failed", name="router", status=ray.get(router.poll.remote()))
                return 2
            if time.time() > deadline:
                emit(event="timeout", pending=["router"])
                return 2
            time.sleep(0.3)
        emit(event="ready", url=url)
        while not stopping["now"]:
            for i, p in enumerate(procs):
                rc = ray.get(p.poll.remote())
                if rc is not None:
                    emit(event="failed", name=started[i][0], status=rc)
                    return 2
            time.sleep(0.5)
        return 0
    finally:
        stop_all()
        emit(event="stopped")


if __name__ == "__main__":
    sys.exit(main())
