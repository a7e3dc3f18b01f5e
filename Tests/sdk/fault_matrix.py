"""The fault matrix: kill -9 of `furcate serve` at random moments during each kind of operation,
then a new server and the checks of what it must have kept.

Kinds: a fork x8 of a running VM, a snapshot of a running VM, a build (a post-build command on
a cached image), an image pull (a new image each round, and the build it feeds), a suspend and
the resume after it, and a snapshot's memory compression (the server compresses every new
snapshot with zstd in the background: the op is done when the snapshot says compressed). Each kind runs once whole to measure how long it takes; then each round
starts it again and kills the server at a uniformly random moment within that time.

After every restart:
- every VM the API had confirmed is there: the parent running and answering exec (or, when
  the kill hit its suspend or resume, suspended or running: never lost);
- nothing half-made shows as ready: a VM the API had not confirmed is gone, lost with a
  reason, or running and answering; a snapshot it had not confirmed is gone, failed with a
  reason, or ready and restorable (a VM made from it answers);
- no QEMU without a running VM, exactly one storage process and one mount;
- `furcate store fsck` (through the storage process) is clean.

Usage: python fault_matrix.py PATH/TO/furcate
FURCATE_FAULT_POINTS: kill points per kind (default 20); FURCATE_FAULT_KINDS: a comma list to
run some kinds only; FURCATE_FAULT_SEED: the random seed (printed, to replay a run).
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import requests

from harness import check, clean_up, free_port, furcate_mounts, furcate_processes, push_busybox, start_registry, wait_port

KINDS = ["fork8", "snapshot", "build", "pull", "suspend-resume", "compress"]


# What a restarted server logs when it finds an operation the last one did not finish.
RECOVERY_EVENTS = [
    "took over a running VM",
    "ended a QEMU a previous server left running",
    "VM lost across a restart",
    "a suspend was cut off by the server's end; the VM runs on",
    "a suspend was cut off by the server's end; the VM is suspended",
    "a resume was cut off by the server's end; the VM is suspended",
    "started an unfinished snapshot compression again",
    "deleted a VM no account owned (its operation was cut off)",
    "a build was interrupted by the server's end",
]


class Server:
    """One data directory, and the `furcate serve` over it that the rounds kill and restart."""

    def __init__(self, furcate, tmp, procs):
        self.furcate, self.tmp, self.procs = furcate, tmp, procs
        self.data = os.path.join(tmp, "data")
        self.port = free_port()
        self.env = dict(os.environ, FURCATE_DATA=self.data, FURCATE_LOG_LEVEL="info")
        self.log = open(os.path.join(tmp, "serve.log"), "a")
        self.proc = None
        self.http = requests.Session()

    def start(self):
        self.proc = subprocess.Popen(
            [self.furcate, "serve", "--port", str(self.port), "--ingress-port", "0", "--warm-pool", "0", "--idle-timeout", "0",
             "--snapshot-compression", "zstd:3"],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self.procs.append(self.proc)
        wait_port(self.port, self.proc, "furcate serve", seconds=300)
        key = open(os.path.join(self.data, "admin-key")).read().strip()
        self.http = requests.Session()  # none of the dead server's pooled connections
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.http.headers["X-API-Key"] = key

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def call(self, method, path, body=None, timeout=600, ok=(200, 201)):
        r = self.http.request(method, f"http://127.0.0.1:{self.port}{path}", json=body, timeout=timeout)
        if r.status_code not in ok:
            raise RuntimeError(f"{method} {path} answered {r.status_code}: {r.text[:400]}")
        return r.json() if r.content else {}

    def exec(self, vm, command="echo ok"):
        return self.call("POST", f"/v1/vms/{vm}/exec-await", {"command": command}, timeout=120)

    def fsck(self):
        p = subprocess.run([self.furcate, "store", "fsck", "--data", self.data, "--json"], env=self.env,
                           capture_output=True, text=True, timeout=600)
        return p.returncode, p.stdout, p.stderr


class Confirmed:
    """What the API answered for: the VMs and snapshots it said were made, and their states."""

    def __init__(self):
        self.vms = {}  # id -> the states it may be in
        self.snapshots = set()  # Freestyle (and InstaVM: the same records) snapshot ids


def wait_build(srv, sid, seconds=600):
    deadline = time.time() + seconds
    while True:
        s = srv.call("GET", f"/instavm/v1/snapshots/{sid}")
        if s["status"] in ("ready", "failed") or time.time() > deadline:
            return s
        time.sleep(0.3)


def wait_compressed(srv, sid, seconds=300):
    deadline = time.time() + seconds
    while True:
        s = srv.call("GET", f"/instavm/v1/snapshots/{sid}")
        if s.get("compression_state") != "compressing" or time.time() > deadline:
            return s
        time.sleep(0.2)


class Matrix:
    def __init__(self, srv, image_of, rng):
        self.srv, self.image_of, self.rng = srv, image_of, rng
        self.confirmed = Confirmed()
        self.round = 0
        self.base_image = image_of(0)
        self.parent = None
        self.base_snapshot = None

    # The operations: each returns once the API answered, recording what it confirmed.

    def op_fork8(self):
        r = self.srv.call("POST", f"/v1/vms/{self.parent}/fork", {"count": 8})
        for f in r["forks"]:
            self.confirmed.vms[f["id"]] = {"running"}

    def op_snapshot(self):
        r = self.srv.call("POST", f"/v1/vms/{self.parent}/snapshot", {"name": f"matrix-{self.round}"})
        self.confirmed.snapshots.add(r["snapshotId"])

    def build(self, image, command):
        s = self.srv.call("POST", "/instavm/v1/snapshots", {
            "oci_image": image, "name": f"matrix-build-{self.round}", "vcpu_count": 1, "memory_mb": 256,
            "build_args": {"post_build_cmd": command}})
        sid = s.get("snapshot_id") or s.get("id")
        self.confirmed.snapshots.add(sid)
        done = wait_build(self.srv, sid)
        if done["status"] != "ready":
            raise RuntimeError(f"build {sid} ended {done['status']}: {done.get('last_error')}")

    def op_build(self):
        self.build(self.base_image, f"echo round {self.round} > /root/round")

    def op_pull(self):
        self.build(self.image_of(self.round), "true")

    def op_suspend_resume(self):
        # Cut off anywhere in the two, the parent is suspended or running (never lost).
        self.confirmed.vms[self.parent] = {"running", "suspended"}
        self.srv.call("POST", f"/v1/vms/{self.parent}/suspend")
        self.srv.call("POST", f"/v1/vms/{self.parent}/start", {}, timeout=600)
        self.confirmed.vms[self.parent] = {"running"}

    def op_compress(self):
        r = self.srv.call("POST", f"/v1/vms/{self.parent}/snapshot", {"name": f"matrix-{self.round}"})
        self.confirmed.snapshots.add(r["snapshotId"])
        s = wait_compressed(self.srv, r["snapshotId"])
        if s.get("compression_state") != "compressed":
            raise RuntimeError(f"compression of {r['snapshotId']} ended {s}")

    # Setup, rounds and checks.

    def setup(self):
        s = self.srv.call("POST", "/instavm/v1/snapshots", {
            "oci_image": self.base_image, "name": "matrix-base", "vcpu_count": 1, "memory_mb": 256})
        self.base_snapshot = s.get("snapshot_id") or s.get("id")
        check(wait_build(self.srv, self.base_snapshot)["status"] == "ready", "the base snapshot is built")
        self.confirmed.snapshots.add(self.base_snapshot)
        vm = self.srv.call("POST", "/v1/vms", {"snapshotId": self.base_snapshot})
        self.parent = vm["id"]
        self.confirmed.vms[self.parent] = {"running"}
        self.srv.exec(self.parent, "echo parent > /root/who && sync")

    def run_kind(self, kind, points):
        op = getattr(self, "op_" + kind.replace("-", "_"))
        self.round += 1
        start = time.time()
        op()
        took = time.time() - start
        self.check(f"{kind} whole")
        print(f"{kind}: a whole run took {took:.2f} s; {points} kill points within it", flush=True)
        outcomes = {"answered before the kill": 0, "cut off": 0}
        for i in range(points):
            self.round += 1
            delay = self.rng.uniform(0, took)
            failure = []

            def attempt():
                try:
                    op()
                except Exception as e:  # the kill cuts the request off: expected
                    failure.append(e)

            t = threading.Thread(target=attempt)
            t.start()
            time.sleep(delay)
            self.srv.kill()
            t.join(timeout=120)
            check(not t.is_alive(), f"{kind} round {i}: the request ended with the server")
            outcomes["cut off" if failure else "answered before the kill"] += 1
            restart = time.time()
            self.srv.start()
            self.check(f"{kind} kill {i + 1}/{points} at {delay:.2f} s (restart took {time.time() - restart:.1f} s)")
        print(f"{kind}: {outcomes}", flush=True)

    def vm_list(self):
        return {v["id"]: v for v in self.srv.call("GET", "/v1/vms")["vms"]}

    def check(self, what):
        srv, c = self.srv, self.confirmed
        vms = self.vm_list()
        for vm, states in list(c.vms.items()):
            check(vm in vms, f"{what}: the confirmed VM {vm} is there")
            v = vms[vm]
            check(v["state"] in states, f"{what}: VM {vm} is {v['state']}, one of {sorted(states)} ({v})")
            if v["state"] == "suspended":
                srv.call("POST", f"/v1/vms/{vm}/start", {}, timeout=600)
            c.vms[vm] = {"running"}
            out = srv.exec(vm, "cat /root/who 2>/dev/null || echo fork")
            check(out.get("statusCode", 0) == 0, f"{what}: VM {vm} answers exec: {out}")
        # What the API did not confirm: whole, or gone, or failed saying why. Forks are deleted
        # here either way (the next round makes new ones).
        for vm, v in vms.items():
            if vm not in c.vms:
                if v["state"] == "running":
                    out = srv.exec(vm)
                    check(out.get("stdout") == "ok\n", f"{what}: an unconfirmed running VM {vm} answers: {out}")
                else:
                    check(v["state"] == "lost" and v.get("lostReason"),
                          f"{what}: an unconfirmed VM is running, or lost with a reason: {v}")
                srv.call("DELETE", f"/v1/vms/{vm}")
        for vm in [v for v in c.vms if v != self.parent]:
            srv.call("DELETE", f"/v1/vms/{vm}")
            del c.vms[vm]
        self.check_snapshots(what)
        self.check_processes(what)

    def check_snapshots(self, what):
        srv, c = self.srv, self.confirmed
        listed = {(s.get("snapshot_id") or s.get("id")): s for s in srv.call("GET", "/instavm/v1/snapshots")}
        for sid in sorted(c.snapshots):
            check(sid in listed, f"{what}: the confirmed snapshot {sid} is there")
        for sid, s in listed.items():
            if s["status"] == "building":
                s = wait_build(srv, sid)
            if s.get("compression_state") == "compressing":
                s = wait_compressed(srv, sid)
            check(s.get("compression_state") != "compressing",
                  f"{what}: a compression cut off by the kill ends (started again): {s}")
            check(s.get("compression_state") != "error", f"{what}: snapshot {sid}'s compression failed: {s}")
            if s["status"] == "failed":
                check(s.get("last_error"), f"{what}: a failed snapshot says why: {s}")
            elif s["status"] == "ready" and sid != self.base_snapshot:
                # Ready means restorable: a VM from it answers.
                vm = srv.call("POST", "/v1/vms", {"snapshotId": sid})["id"]
                out = srv.exec(vm)
                check(out.get("stdout") == "ok\n", f"{what}: a VM from the ready snapshot {sid} answers: {out}")
                srv.call("DELETE", f"/v1/vms/{vm}")
            else:
                check(s["status"] == "ready", f"{what}: snapshot {sid} is ready, building or failed: {s}")
            if sid != self.base_snapshot:
                srv.call("DELETE", f"/instavm/v1/snapshots/{sid}", ok=(200, 204))
                c.snapshots.discard(sid)

    def check_processes(self, what):
        srv = self.srv
        running = [v for v in self.vm_list().values() if v["state"] == "running"]
        deadline = time.time() + 30
        while True:
            procs = furcate_processes(srv.data)
            qemus = [p for p in procs if "qemu" in p]
            storage = [p for p in procs if " store serve " in p]
            if len(qemus) == len(running) or time.time() > deadline:
                break
            time.sleep(0.2)
        if len(qemus) != len(running):
            subprocess.run(["ps", "-o", "pid,ppid,stat,etime,args", "-p", ",".join(q.split(":")[0] for q in qemus)])
            print("running:", [v["id"] for v in running])
        check(len(qemus) == len(running), f"{what}: a QEMU for each of the {len(running)} running VMs, no more: {qemus}")
        check(len(storage) == 1, f"{what}: one storage process: {storage}")
        mounts = furcate_mounts(srv.data)
        check(mounts == [os.path.join(srv.data, "mnt")], f"{what}: the store's one mount: {mounts}")
        rc, out, err = srv.fsck()
        report = json.loads(out) if out.strip().startswith("{") else {}
        check(rc == 0 and not report.get("damage") and not report.get("problems"),
              f"{what}: furcate store fsck is clean: rc {rc} {out[-400:]} {err[-400:]}")


def main():
    furcate = os.path.abspath(sys.argv[1])
    points = int(os.environ.get("FURCATE_FAULT_POINTS", "20"))
    kinds = [k for k in os.environ.get("FURCATE_FAULT_KINDS", ",".join(KINDS)).split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise SystemExit(f"FURCATE_FAULT_KINDS: no kind {unknown}; the kinds are {KINDS}")
    seed = int(os.environ.get("FURCATE_FAULT_SEED", str(random.randrange(1 << 30))))
    print(f"fault matrix: {points} kill points per kind, kinds {kinds}, FURCATE_FAULT_SEED={seed}", flush=True)
    rng = random.Random(seed)
    tmp = tempfile.mkdtemp(prefix="ffault-", dir="/tmp")
    procs = []
    started = time.time()
    try:
        registry = start_registry(tmp, procs)
        pushed = {}

        def image_of(n):
            # Round n's image: busybox and 8 MiB of its own (so a pull has layers to fetch).
            if n not in pushed:
                pushed[n] = push_busybox(tmp, registry, "matrix/busybox", tag=str(n),
                                         extra=rng.randbytes(8 << 20) if n else None)
            return pushed[n]

        srv = Server(furcate, tmp, procs)
        srv.start()
        m = Matrix(srv, image_of, rng)
        m.setup()
        m.check("setup")
        for kind in kinds:
            if kind == "pull":
                for n in range(m.round + 1, m.round + points + 2):
                    image_of(n)  # pushed before the rounds: the kill points fall in the pull, not in skopeo
            m.run_kind(kind, points)
        srv.proc.send_signal(signal.SIGTERM)
        check(srv.proc.wait(timeout=300) == 0, "furcate serve exits 0 on SIGTERM")
        check(not furcate_processes(srv.data), f"nothing outlives the stop: {furcate_processes(srv.data)}")
        print("what the restarts found (from the servers' log):")
        log = open(os.path.join(tmp, "serve.log")).read()
        for event in RECOVERY_EVENTS:
            print(f"  {log.count(event):5d}  {event}")
        print(f"fault matrix: all checks passed ({len(kinds)} kinds x {points} kill points, "
              f"{time.time() - started:.0f} s, FURCATE_FAULT_SEED={seed})")
    except Exception:
        print(f"fault matrix: failed; replay with FURCATE_FAULT_SEED={seed}")
        raise
    finally:
        kept = os.environ.get("FURCATE_FAULT_KEEP_LOG")
        if kept and os.path.exists(os.path.join(tmp, "serve.log")):
            shutil.copy(os.path.join(tmp, "serve.log"), kept)
        clean_up(tmp, procs, failed=sys.exc_info()[0] is not None, log_lines=80)

if __name__ == "__main__":
    main()
