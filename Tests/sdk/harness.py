"""What the API tests against a live `furcate serve` share: loopback ports, a docker-registry
holding a busybox image (OCI layout pushed by skopeo), checks that print what differed, and the
processes and mounts Furcate has under a data directory.
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
import tarfile
import time


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


def busybox_layout(layout, busybox="/bin/busybox", extra=None):
    """An OCI image layout: one layer with busybox as /bin/busybox and its applets as links."""
    os.makedirs(os.path.join(layout, "blobs", "sha256"))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        for d in ["bin", "tmp", "root", "etc"]:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            t.addfile(info)
        t.add(busybox, arcname="bin/busybox")
        for applet in ["sh", "echo", "cat", "ls", "mkdir", "sleep", "true", "uname", "env", "sync", "dd", "rm", "fstrim", "df", "cat", "mount", "kill", "httpd", "nc", "printf", "tail"]:
            info = tarfile.TarInfo("bin/" + applet)
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            t.addfile(info)
        if extra is not None:
            info = tarfile.TarInfo("extra.bin")
            info.size = len(extra)
            t.addfile(info, io.BytesIO(extra))
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


def start_registry(tmp, procs):
    """Debian's docker-registry on a loopback port, storing under tmp; returns its address."""
    reg_port = free_port()
    with open(os.path.join(tmp, "registry.yml"), "w") as f:
        f.write(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {tmp}/registry\n"
                f"http:\n  addr: 127.0.0.1:{reg_port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", os.path.join(tmp, "registry.yml")],
                                stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "registry.log"), "w"))
    procs.append(registry)
    wait_port(reg_port, registry, "docker-registry")
    return f"127.0.0.1:{reg_port}"


def push_busybox(tmp, registry, name, tag="1", extra=None):
    """Pushes a busybox image (with `extra` bytes as /extra.bin when given) as registry/name:tag."""
    layout = os.path.join(tmp, f"layout-{name.replace('/', '-')}-{tag}")
    busybox_layout(layout, extra=extra)
    image = f"{registry}/{name}:{tag}"
    subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{image}"],
                   check=True)
    return image


def furcate_mounts(root):
    """Mount points under root, from /proc/mounts."""
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(root)]


def clean_up(tmp, procs, failed, log_lines=60):
    """After a test: on failure the server log's tail; then every process the test started is
    stopped (SIGTERM, then SIGKILL), and what a killed server left under tmp/data (its storage
    process, QEMUs, the mount) is ended too, before tmp is removed."""
    log = os.path.join(tmp, "serve.log")
    if failed and os.path.exists(log):
        print(f"--- furcate serve log (last {log_lines} lines) ---")
        print("".join(open(log).readlines()[-log_lines:]))
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                p.kill()
    data = os.path.join(tmp, "data")
    for line in furcate_processes(data):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.5)
    subprocess.run(["umount", "-l", os.path.join(data, "mnt")], stderr=subprocess.DEVNULL)
    shutil.rmtree(tmp, ignore_errors=True)


def sh(cmd):
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL)


def free_pool():
    """An unused /24 of 10.249.0.0/16 (no route of the host's overlaps it) for --vm-network."""
    routes = subprocess.run(["ip", "-o", "-4", "route", "show", "table", "all"], capture_output=True, text=True).stdout
    for third in range(os.getpid() % 200, 256):
        if f"10.249.{third}." not in routes and "10.249.0.0/16" not in routes and "10.0.0.0/8" not in routes:
            return f"10.249.{third}.0/24"
    raise SystemExit("no free /24 in 10.249.0.0/16 for the VM network pool")


def network_names():
    """Furcate's network namespaces, links and nftables tables on this host, as one set."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    links = [l.split(": ")[1].split("@")[0] for l in
             subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines()]
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout.splitlines()
    return {n for n in ns if n.startswith("fc-")} | {l for l in links if l.startswith("fc")} | \
        {t for t in tables if "furcate" in t}


class TestInternet:
    """A namespace of the test's own as "the internet": 203.0.113.10 (its HTTP server on port
    8000 answers every path with `marker`), reached from this host through its own veth link
    (203.0.113.1), which forwards for it."""

    def __init__(self, tmp, procs, marker):
        self.ns, self.link = f"fst-{os.getpid() % 100000}", f"fst{os.getpid() % 100000}i"
        self.address = "203.0.113.10"
        sh(f"ip netns add {self.ns}")
        try:
            sh(f"ip link add {self.link} type veth peer name eth0 netns {self.ns}")
            sh(f"ip addr add 203.0.113.1/24 dev {self.link} && ip link set {self.link} up")
            sh(f"sysctl -qw net.ipv4.conf.{self.link}.forwarding=1 net.ipv6.conf.{self.link}.disable_ipv6=1")
            sh(f"ip -n {self.ns} addr add {self.address}/24 dev eth0 && ip -n {self.ns} link set eth0 up"
               f" && ip -n {self.ns} link set lo up && ip -n {self.ns} route add default via 203.0.113.1")
            www = os.path.join(tmp, "internet-www")
            os.makedirs(www)
            with open(os.path.join(www, "index.html"), "w") as f:
                f.write(marker + "\n")
            server = subprocess.Popen(["nsenter", f"--net=/run/netns/{self.ns}", "python3", "-m", "http.server", "8000",
                                       "--bind", self.address, "--directory", www],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            procs.append(server)
            deadline = time.time() + 30
            while subprocess.run(["curl", "-s", "-m", "1", f"http://{self.address}:8000/"],
                                 stdout=subprocess.DEVNULL).returncode != 0:
                if time.time() > deadline:
                    raise SystemExit("the test internet's server did not start")
                time.sleep(0.1)
        except BaseException:
            self.remove()
            raise

    def remove(self):
        subprocess.run(["ip", "netns", "del", self.ns], stderr=subprocess.DEVNULL)
        subprocess.run(["ip", "link", "del", self.link], stderr=subprocess.DEVNULL)
