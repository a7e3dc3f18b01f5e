"""The official `instavm` Python SDK, unmodified, against a live `furcate serve`.

Brings its own parts: Debian's docker-registry on loopback with a busybox image pushed by
skopeo, and a `furcate serve` on a fresh data directory. Usage:
    python instavm_sdk_test.py PATH/TO/furcate
Exits non-zero on the first failed check, printing what differed.
"""
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import requests
from instavm import InstaVM


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, what, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{what} did not listen on {port} within {seconds} s")


def blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return "sha256:" + digest


def busybox_layout(layout, busybox="/bin/busybox"):
    """An OCI image layout: one layer with busybox as /bin/busybox and its applets as links."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for d in ["bin", "tmp", "root", "etc"]:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        t.add(busybox, arcname="bin/busybox")
        for applet in ["sh", "echo", "cat", "ls", "mkdir", "sleep", "true", "uname", "env", "sync", "dd", "rm", "fstrim", "df", "cat", "mount", "kill"]:
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(info)
        motd = b"built for the instavm SDK test\n"
        info = tarfile.TarInfo("etc/motd")
        info.size = len(motd)
        t.addfile(info, io.BytesIO(motd))
    diff_id = "sha256:" + hashlib.sha256(raw.getvalue()).hexdigest()
    layer = gzip.compress(raw.getvalue())
    layer_digest = blob(layout, layer)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "SDK_TEST=1"], "WorkingDir": "/root"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }).encode()
    config_digest = blob(layout, config)
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer_digest, "size": len(layer)}],
    }).encode()
    manifest_digest = blob(layout, manifest)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": "1"}}]}, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)


def check(cond, what):
    if not cond:
        raise SystemExit("FAILED: " + what)
    print("ok:", what.split("\n")[0][:160])


def furcate_processes(root):
    """Processes whose command line names a path under root (QEMUs name their files there)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if root in cmd:
            found.append(f"{pid}: {cmd[:160]}")
    return found


def main():
    furcate = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="fsdk-", dir="/tmp")
    procs = []
    try:
        # A registry with the test image.
        reg_port = free_port()
        with open(os.path.join(tmp, "registry.yml"), "w") as f:
            f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
                    f"http:\n  addr: 127.0.0.1:{reg_port}\n")
        registry = subprocess.Popen(["docker-registry", "serve", os.path.join(tmp, "registry.yml")],
                                    stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "registry.log"), "w"))
        procs.append(registry)
        wait_port(reg_port, registry, "docker-registry")
        busybox_layout(os.path.join(tmp, "layout"))
        image = f"127.0.0.1:{reg_port}/sdk/busybox:1"
        subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{tmp}/layout:1", f"docker://{image}"], check=True)

        # furcate serve on a fresh data directory.
        port = free_port()
        env = dict(os.environ, FURCATE_DATA=os.path.join(tmp, "data"))
        serve_log = open(os.path.join(tmp, "serve.log"), "w")
        serve = subprocess.Popen([furcate, "serve", "--port", str(port)], env=env, stdout=serve_log, stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_port(port, serve, "furcate serve", seconds=120)
        key = open(os.path.join(tmp, "data", "admin-key")).read().strip()
        base = f"http://127.0.0.1:{port}/instavm"

        # The SDK as users write it: a client whose constructor starts a session (a VM of the
        # default image), then execute.
        client = InstaVM(key, base_url=base, timeout=600)
        check(client.session_id, f"InstaVM(...) started a session: {client.session_id}")
        out = client.execute("echo hi from $(uname -s)")
        check(out.get("stdout") == "hi from Linux\n", f"execute in the session: {out}")

        # Upload and download through the session.
        src = os.path.join(tmp, "upload.bin")
        payload = bytes(range(256)) * 300
        with open(src, "wb") as f:
            f.write(payload)
        up = client.upload_file(src, "/root/up/data.bin")
        check(up.get("size") == len(payload), f"upload_file: {up}")
        down = client.download_file("/root/up/data.bin")
        check(down["content"] == payload, "download_file returns the uploaded bytes")

        # Bad input: FastAPI-style 422 bodies.
        r = requests.post(f"{base}/v1/snapshots", headers={"X-API-Key": key}, json={"oci_image": image, "vcpu_count": 99})
        check(r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "vcpu_count"], f"vcpu_count=99 → 422 {r.text}")
        r = requests.post(f"{base}/v1/vms", headers={"X-API-Key": key}, json={"custom_domain": {"domain": "x.example"}})
        check(r.status_code == 422 and "custom_domain" in r.text, f"custom_domain is refused, not ignored: {r.status_code} {r.text}")
        r = requests.get(f"{base}/v1/vms", headers={"X-API-Key": "fk_wrong"})
        check(r.status_code == 401 and "detail" in r.json(), f"a wrong key → 401: {r.text}")

        # Snapshots from an OCI image: asynchronous build, polled until ready.
        snap = client.snapshots.create(oci_image=image, name="sdk-busybox", vcpu_count=1, memory_mb=256,
                                       build_args={"envs": {"FROM_BUILD": "yes"}, "post_build_cmd": "echo built > /root/built.txt"})
        sid = snap.get("snapshot_id") or snap.get("id")
        check(sid and snap["status"] in ("building", "ready"), f"snapshots.create: {snap}")
        deadline = time.time() + 600
        while True:
            current = client.snapshots.get(sid)
            if current["status"] in ("ready", "failed") or time.time() > deadline:
                break
            time.sleep(1)
        check(current["status"] == "ready", f"the build finished ready: {current}")
        check(current["size_bytes"] > 0 and current["oci_image"] == image and current["snapshot_type"] == "oci", f"snapshot fields: {current}")
        listed = client.snapshots.list()
        check(any((s.get("snapshot_id") or s.get("id")) == sid for s in listed), f"snapshots.list has it ({len(listed)} snapshots)")

        # A VM from the snapshot; execute in it by pointing the client's session at it.
        vm = client.vms.create(snapshot_id=sid, vm_lifetime_seconds=3600)
        vm_id = vm["vm_id"]
        check(vm_id and vm["status"] == "running", f"vms.create: {vm}")
        check(any(v["vm_id"] == vm_id for v in client.vms.list()), "vms.list has the VM")
        client.session_id = vm["session_id"]
        out = client.execute("cat /root/built.txt; echo $FROM_BUILD $SDK_TEST; cat /etc/motd")
        check(out.get("stdout") == "built\nyes 1\nbuilt for the instavm SDK test\n", f"the VM has the build's file, env and the image: {out}")
        client.execute("echo before-snapshot > /root/mark")

        vsnap = client.vms.snapshot(vm_id, name="after-mark")
        vsid = vsnap.get("snapshot_id") or vsnap.get("id")
        check(vsnap["status"] == "ready" and vsnap["source_vm_id"] == vm_id, f"vms.snapshot: {vsnap}")
        clone = client.vms.clone(vm_id, snapshot_name="clone-point")
        check(clone["vm_id"] and clone["vm_id"] != vm_id and clone["status"] == "running", f"vms.clone: {clone}")
        client.session_id = clone["session_id"]
        out = client.execute("cat /root/mark; echo clone-only > /root/mark2")
        check(out.get("stdout") == "before-snapshot\n", f"the clone continues the parent's disk: {out}")
        client.session_id = vm_id
        out = client.execute("cat /root/mark2 2>/dev/null || echo absent")
        check(out.get("stdout") == "absent\n", f"the parent does not see the clone's file: {out}")

        check(client.vms.delete(clone["vm_id"]).get("status") == "deleted", "vms.delete(clone)")
        check(client.vms.delete(vm_id).get("status") == "deleted", "vms.delete(vm)")
        try:
            client.vms.get(vm_id)
            check(False, "a deleted VM is gone")
        except requests.exceptions.HTTPError as e:
            check(e.response.status_code == 404, "a deleted VM answers 404")
        client.snapshots.delete(vsid)
        client.snapshots.delete(sid)
        try:
            client.snapshots.get(sid)
            check(False, "a deleted snapshot is gone")
        except requests.exceptions.HTTPError as e:
            check(e.response.status_code == 404, "a deleted snapshot answers 404")

        # A graceful stop leaves nothing running that the next start does not take up again. A
        # new session just before SIGTERM (its restore sends the warm pool refilling while the
        # server stops): the VM is suspended into the store, no QEMU (the VM's or a pooled one)
        # outlives the server, and the next server resumes the VM with its memory.
        last = InstaVM(key, base_url=base, timeout=600)
        last.execute("echo kept-in-memory > /tmp/marker")
        check(furcate_processes(tmp + "/data"), "the check below sees the server's QEMUs while it runs")
        serve.send_signal(signal.SIGTERM)
        check(serve.wait(timeout=300) == 0, "furcate serve exits 0 on SIGTERM")
        check(not furcate_processes(tmp + "/data"), f"nothing outlives a graceful stop: {furcate_processes(tmp + '/data')}")
        serve = subprocess.Popen([furcate, "serve", "--port", str(port)], env=env, stdout=serve_log, stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_port(port, serve, "furcate serve (again)", seconds=300)
        out = last.execute("cat /tmp/marker")
        check(out.get("stdout") == "kept-in-memory\n", f"the next server resumed the VM, memory and all: {out}")

        # kill -9 of the server: the VM runs on in its QEMU, its disk and RAM served by the
        # storage process, and the next server takes it over: a value in a tmpfs and a process
        # started before the crash are still there.
        out = last.execute("mkdir -p /run/t && mount -t tmpfs tmpfs /run/t && echo in-tmpfs > /run/t/v && "
                           "(sleep 100000 > /dev/null 2>&1 & echo $! > /run/t/pid)")
        check(out.get("exit_code", 0) == 0, f"a tmpfs value and a background process: {out}")
        qemus = sorted(p.split(":")[0] for p in furcate_processes(tmp + "/data") if "qemu" in p)
        serve.send_signal(signal.SIGKILL)
        serve.wait(timeout=60)
        check(furcate_processes(tmp + "/data"), "the VMs' QEMUs and the storage process outlive kill -9 of the server")
        serve = subprocess.Popen([furcate, "serve", "--port", str(port)], env=env, stdout=serve_log, stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_port(port, serve, "furcate serve (after kill -9)", seconds=300)
        out = last.execute("cat /run/t/v; kill -0 $(cat /run/t/pid) && echo alive")
        check(out.get("stdout") == "in-tmpfs\nalive\n", f"the next server took the VM over, running, memory intact: {out}")
        after = sorted(p.split(":")[0] for p in furcate_processes(tmp + "/data") if "qemu" in p)
        check(set(after) <= set(qemus), f"no QEMU was started again for it: {qemus} then {after}")
        serve.send_signal(signal.SIGTERM)
        check(serve.wait(timeout=300) == 0, "furcate serve exits 0 on SIGTERM again")
        check(not furcate_processes(tmp + "/data"), f"nothing outlives the second stop: {furcate_processes(tmp + '/data')}")
        print("instavm SDK: all checks passed")
    except requests.exceptions.HTTPError as e:
        print(f"HTTP {e.response.status_code} from {e.request.method} {e.request.url}: {e.response.text}")
        raise
    finally:
        if sys.exc_info()[0] is not None and os.path.exists(os.path.join(tmp, "serve.log")):
            print("--- furcate serve log (last 60 lines) ---")
            print("".join(open(os.path.join(tmp, "serve.log")).readlines()[-60:]))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
        subprocess.run(["umount", "-l", os.path.join(tmp, "data", "mnt")], stderr=subprocess.DEVNULL)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
