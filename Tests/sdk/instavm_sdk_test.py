"""The official `instavm` Python SDK, unmodified, against a live `furcate serve`.

Brings its own parts: Debian's docker-registry on loopback with a busybox image pushed by
skopeo, and a `furcate serve` on a fresh data directory. Usage:
    python instavm_sdk_test.py PATH/TO/furcate
Exits non-zero on the first failed check, printing what differed.
"""
import os
import signal
import subprocess
import sys
import tempfile
import time

import requests
from instavm import InstaVM

from harness import (TestInternet, check, clean_up, free_pool, free_port, furcate_processes, network_names, push_busybox,
                     start_registry, wait_port)


def main():
    furcate = os.path.abspath(sys.argv[1])
    tmp = tempfile.mkdtemp(prefix="fsdk-", dir="/tmp")
    procs = []
    internet = None
    try:
        # A registry with the test image.
        image = push_busybox(tmp, start_registry(tmp, procs), "sdk/busybox")

        # A test "internet" its VMs reach through their own networks.
        networks_before = network_names()
        internet = TestInternet(tmp, procs, "internet-marker")

        # furcate serve on a fresh data directory, every VM on a network of its own.
        port, ingress = free_port(), free_port()
        env = dict(os.environ, FURCATE_DATA=os.path.join(tmp, "data"))
        serve_log = open(os.path.join(tmp, "serve.log"), "w")
        argv = [furcate, "serve", "--port", str(port), "--vm-network", free_pool(), "--ingress-port", str(ingress)]
        serve = subprocess.Popen(argv, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
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

        # Its dev server through the ingress (shares.create), and egress on its own network:
        # the test internet answers until set_vm_egress denies it, in force at once.
        out = client.execute("mkdir -p /root/www && echo sdk-page > /root/www/index.html && httpd -p 8000 -h /root/www && echo up")
        check(out.get("stdout") == "up\n", f"a dev server in the VM: {out}")
        share = client.shares.create(port=8000, vm_id=vm_id, is_public=True)
        check(share.get("url", "").startswith(f"http://{vm_id}-8000.localhost:{ingress}"), f"shares.create: {share}")
        page = requests.get(f"http://127.0.0.1:{ingress}/", headers={"Host": f"{vm_id}-8000.localhost"}, timeout=60)
        check(page.status_code == 200 and page.text == "sdk-page\n", f"the share's URL serves the guest's page: {page.status_code} {page.text}")
        fetch = f"printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {internet.address} 8000 | tail -n 1"
        out = client.execute(fetch)
        check(out.get("stdout") == "internet-marker\n", f"the VM reaches the test internet: {out}")
        out = client.execute("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 10.0.2.2 %d | tail -n 1" % port)
        check("openapi" not in out.get("stdout", "") and out.get("stdout", "").strip() == "", f"nor this server's API on the host: {out}")
        policy = client.set_vm_egress(vm_id, allow_http=False, allow_https=False)
        check(policy.get("allow_http") is False and policy.get("allow_https") is False, f"set_vm_egress: {policy}")
        out = client.execute(fetch)
        check(out.get("stdout", "").strip() == "", f"a denied destination fails from execute: {out}")
        check(client.get_vm_egress(vm_id).get("allow_http") is False, "get_vm_egress says so")
        client.set_vm_egress(vm_id)

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
        serve = subprocess.Popen(argv, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
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
        serve = subprocess.Popen(argv, env=env, stdout=serve_log, stderr=subprocess.STDOUT)
        procs.append(serve)
        wait_port(port, serve, "furcate serve (after kill -9)", seconds=300)
        out = last.execute("cat /run/t/v; kill -0 $(cat /run/t/pid) && echo alive")
        check(out.get("stdout") == "in-tmpfs\nalive\n", f"the next server took the VM over, running, memory intact: {out}")
        after = sorted(p.split(":")[0] for p in furcate_processes(tmp + "/data") if "qemu" in p)
        check(set(after) <= set(qemus), f"no QEMU was started again for it: {qemus} then {after}")

        # kill -9 of the storage process: the VM's disk and RAM were served by it, so the VM is
        # lost, saying why; its disk as last synced is kept, and resume boots it again from it
        # (the tmpfs is gone with the memory). A new storage process serves the store meanwhile.
        out = last.execute("echo synced-before > /root/synced && sync")
        check(out.get("exit_code", 0) == 0, f"a synced file: {out}")
        storage = [int(p.split(":")[0]) for p in furcate_processes(tmp + "/data") if " store serve " in p]
        check(len(storage) == 1, f"one storage process: {furcate_processes(tmp + '/data')}")
        os.kill(storage[0], signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline:
            record = last.vms.get(last.session_id)
            if record.get("status") == "failed":
                break
            time.sleep(0.5)
        check(record.get("status") == "failed" and "storage process" in (record.get("last_error") or ""),
              f"the VM is lost, saying why: {record}")
        check(not [p for p in furcate_processes(tmp + "/data") if "qemu" in p],
              f"its QEMU was ended: {furcate_processes(tmp + '/data')}")
        r = requests.post(f"{base}/v1/vms/{last.session_id}/resume", headers={"X-API-Key": key}, timeout=600)
        check(r.status_code == 200, f"resume of the lost VM boots it again: {r.status_code} {r.text}")
        out = last.execute("cat /root/synced; cat /run/t/v 2>/dev/null || echo no-tmpfs")
        check(out.get("stdout") == "synced-before\nno-tmpfs\n", f"booted again from its synced disk: {out}")
        serve.send_signal(signal.SIGTERM)
        check(serve.wait(timeout=300) == 0, "furcate serve exits 0 on SIGTERM again")
        check(not furcate_processes(tmp + "/data"), f"nothing outlives the second stop: {furcate_processes(tmp + '/data')}")
        internet.remove()
        check(network_names() == networks_before,
              f"no namespace, link or table of the VM networks is left: {network_names() - networks_before}")
        print("instavm SDK: all checks passed")
    except requests.exceptions.HTTPError as e:
        print(f"HTTP {e.response.status_code} from {e.request.method} {e.request.url}: {e.response.text}")
        raise
    finally:
        if internet:
            internet.remove()
        clean_up(tmp, procs, failed=sys.exc_info()[0] is not None)

if __name__ == "__main__":
    main()
