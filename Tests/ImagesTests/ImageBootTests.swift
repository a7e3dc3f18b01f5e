import BlockStore
import Foundation
import FurcateCore
import FurcateTestSupport
import GuestAgentProtocol
import Hypervisor
import Images
import StoreFS
import Testing
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Why an image cannot be booted here, or nil.
let bootUnavailable: String? = {
    if let why = TestRegistry.unavailable { return why }
    if access("/dev/fuse", R_OK | W_OK) != 0 { return "/dev/fuse is not usable" }
    if geteuid() != 0 { return "mounting needs root" }
    if access(QEMUProcess.binary, X_OK) != 0 { return "\(QEMUProcess.binary) is not installed" }
    for a in ["vmlinuz", "initrd.img", "furcate-agent"] where access(guestDir + "/" + a, R_OK) != 0 {
        return "\(guestDir)/\(a) is missing (scripts/guest-artifacts.sh builds it)"
    }
    return nil
}()

let bootAvailable = facilityAvailable("image boot tests", unavailable: bootUnavailable)

/// An image pushed to a registry, pulled, booted: the agent (injected at import, the init of an
/// image without one) proves the layers were applied and the image's Env is set.
@Suite(.enabled(if: bootAvailable)) struct ImageBootTests {
    @Test func aPulledImageBootsWithItsLayersAndEnvironment() async throws {
        let reg = try TestRegistry()
        let b = try BuildHarness()
        defer { Task { await b.tearDown() } }
        let (h, vms) = (b.images, b.vms)
        let lay = h.tmp.sub("layout")
        try TestImage.twoLayerLayout(lay)
        try reg.push(layout: lay, tag: "1", as: "test/boot:1")
        let image = try await h.service.pull("\(reg.host)/test/boot:1")
        let vm = try await vms.create(CreateVMRequest(image: image.storeFile))
        do {
            let agent = try await vms.agent(vm.id, timeout: .seconds(60))
            func run(_ cmd: String) async throws -> (Int32?, String) {
                let r = try await agent.exec(ExecRequest(command: cmd, timeoutMs: 20_000))
                return (
                    r.exitCode,
                    String(decoding: r.stdout + r.stderr, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                )
            }
            let env = try await run("echo $FURCATE_IMAGE_ENV")
            #expect(env.0 == 0 && env.1 == "from-the-image", "the image's Env reaches exec: \(env)")
            let removed = try await run("cat /etc/removed.txt")
            #expect(removed.0 != 0, "the whiteout hid the file: \(removed)")
            let kept = try await run("cat /etc/kept.txt")
            #expect(kept.0 == 0 && kept.1 == "kept")
            let opaque = try await run("ls /opt/old")
            #expect(opaque.1 == "b.txt", "the opaque directory holds only the upper layer's entry: \(opaque)")
            let links = try await run("stat -c '%i %h' /data/hello /data/hello-link")
            let lines = links.1.split(separator: "\n")
            #expect(
                links.0 == 0 && lines.count == 2 && lines[0] == lines[1] && lines[0].hasSuffix(" 2"),
                "the hard link holds: \(links)")
            let hello = try await run("cat /data/hello-link")
            #expect(hello.1 == "hello from layer two")
            // The user-mode network reaches the host (10.0.2.2 is the host's loopback): the registry.
            let net = try await run("wget -q -O - http://10.0.2.2:\(reg.port)/v2/")
            #expect(net.0 == 0 && net.1 == "{}", "the guest reaches a host service through the user-mode NIC: \(net)")
            // The guest can write its disk (a clone of the image, which stays unchanged).
            let w = try await run("echo written > /data/new && cat /data/new")
            #expect(w.1 == "written")
            #expect(
                try h.debugfs(image, "stat /data/new").contains("File not found"), "the image's own rootfs is untouched"
            )
        } catch {
            Issue.record(
                "\(error): console: \(QEMUProcess.logTail(vms.runDirectory(vm.id) + "/console.log", lines: 60))")
        }
        try await vms.delete(vm.id)
        await b.tearDown()
    }
}

/// Debian 12 with systemd (mmdebstrap, built by scripts/guest-artifacts.sh): systemd boots as
/// PID 1 after the agent, which answers and manages services through systemd.
@Suite(.enabled(if: bootAvailable && FileManager.default.isReadableFile(atPath: guestDir + "/debian-12-systemd.tar")))
struct SystemdImageTests {
    @Test func systemdBootsAndRunsTheAgentsServices() async throws {
        let b = try BuildHarness(memoryMiB: 256)
        defer { Task { await b.tearDown() } }
        let (h, vms) = (b.images, b.vms)
        let image = try await h.service.pull("rootfs:\(guestDir)/debian-12-systemd.tar")
        let vm = try await vms.create(CreateVMRequest(image: image.storeFile))
        do {
            let agent = try await vms.agent(vm.id, timeout: .seconds(90))
            func run(_ cmd: String) async throws -> (Int32?, String) {
                let r = try await agent.exec(ExecRequest(command: cmd, timeoutMs: 300_000))
                return (
                    r.exitCode,
                    String(decoding: r.stdout + r.stderr, as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines)
                )
            }
            let pid1 = try await run("readlink /proc/1/exe")
            let diag = try await run(
                "cat /proc/1/cmdline | tr '\\0' ' '; ls /run/systemd; journalctl -b --no-pager 2>&1 | tail -20")
            #expect(
                pid1.1.hasSuffix("/systemd"),
                "\(pid1) \(diag) console: \(QEMUProcess.logTail(vms.runDirectory(vm.id) + "/console.log", lines: 40))")
            // The agent answers before systemd has its bus up: wait for its private socket.
            // Minutes, not seconds: under TCG with the whole suite running beside it, one CI run
            // took over 20 s to get systemd's jobs done.
            // systemctl's own calls time out after 25 s when PID 1 is slow to answer (one run:
            // "Failed to query system state: Connection timed out"): ask again until it says.
            let state = try await run(
                """
                for i in $(seq 1 1200); do [ -S /run/systemd/private ] && break; sleep 0.1; done
                for i in $(seq 1 10); do
                  s=$(timeout 60 systemctl is-system-running --wait 2>&1)
                  case "$s" in running|degraded) break;; esac
                  sleep 1
                done
                echo "$s"
                """
            )
            let failed = try await run(
                "systemctl --failed --no-legend; systemctl list-jobs --no-legend; systemctl is-system-running")
            #expect(["running", "degraded"].contains(state.1), "\(state) failed units: \(failed)")

            // Services go through systemd: a unit file, the journal, systemd's restarts.
            let spec = ServiceSpec(
                name: "ticker", mode: "service",
                exec: ["echo starting", "while true; do echo \"tick $IMG_VAR\"; sleep 0.5; done"],
                env: ["IMG_VAR": "from-spec"], restartPolicy: RestartPolicy(policy: "always", restartSec: 1))
            guard
                case .service(let created) = try await agent.request(
                    .serviceCreate(spec, start: true), timeout: .seconds(90))
            else {
                Issue.record("serviceCreate answered something else"); return
            }
            #expect(created.activeState == "active" && created.subState == "running", "\(created)")
            let unit = try await run(
                "systemctl is-active ticker.service; systemctl is-enabled ticker.service; head -1 /etc/systemd/system/ticker.service"
            )
            #expect(unit.1.hasPrefix("active\nenabled\n# Created by furcate-agent"), "\(unit)")
            let logs: [LogEntry] =
                try await eventually {
                    guard case .logs(let got) = try await agent.request(.serviceLogs(name: "ticker", lines: 20)) else {
                        return nil
                    }
                    return got.filter { $0.text == "tick from-spec" }.count >= 2 ? got : nil
                } ?? []
            #expect(logs.contains { $0.text == "tick from-spec" }, "\(logs)")
            // The journal's times: `since` keeps what was written at or after it.
            let last = try #require(logs.last)
            guard
                case .logs(let recent) = try await agent.request(
                    .serviceLogs(name: "ticker", lines: 20, since: last.time))
            else { Issue.record("no logs"); return }
            #expect(
                !recent.isEmpty && recent.count < logs.count && recent.allSatisfy { $0.time >= last.time },
                "\(recent) of \(logs)")
            // Killed: systemd restarts it (policy always).
            _ = try await run("kill -9 \(created.mainPID ?? 0)")
            // restartSec 1: systemd brings it back within seconds, longer on a loaded host.
            var lastStatus: ServiceStatus?
            let after: ServiceStatus? = try await eventually {
                guard case .service(let s) = try await agent.request(.serviceStatus(name: "ticker")) else { return nil }
                lastStatus = s
                return s.restarts >= 1 && s.activeState == "active" ? s : nil
            }
            guard let after else {
                Issue.record("systemd did not restart the killed service in 120 s: \(String(describing: lastStatus))");
                return
            }
            #expect(
                after.restarts >= 1 && after.activeState == "active" && after.mainPID != created.mainPID, "\(after)")
            guard case .services(let all) = try await agent.request(.serviceList) else {
                Issue.record("no list"); return
            }
            #expect(all.map(\.name) == ["ticker"], "only the agent's own units are listed: \(all.map(\.name))")
            // A oneshot that deletes itself after success.
            let once = ServiceSpec(
                name: "once", mode: "oneshot", exec: ["touch /tmp/once-ran"], deleteAfterSuccess: true)
            _ = try await agent.request(.serviceCreate(once, start: true), timeout: .seconds(90))
            let ran = try await run(
                "test -e /tmp/once-ran && echo ran; test -e /etc/systemd/system/once.service && echo kept || echo gone")
            #expect(ran.1 == "ran\ngone", "\(ran)")
            _ = try await agent.request(.serviceControl(name: "ticker", action: "delete"), timeout: .seconds(60))
            let gone = try await run(
                "systemctl is-active ticker.service; test -e /etc/systemd/system/ticker.service && echo kept || echo gone"
            )
            #expect(gone.1.hasSuffix("gone") && !gone.1.hasPrefix("active"), "\(gone)")
            await #expect(throws: FurcateError.self) {
                try await agent.request(.serviceStatus(name: "systemd-journald"))
            }
        } catch {
            Issue.record(
                "\(error): console: \(QEMUProcess.logTail(vms.runDirectory(vm.id) + "/console.log", lines: 40))")
        }
        try await vms.delete(vm.id)
        await b.tearDown()
    }
}

/// The default image: booted once on first use, its ready snapshot kept; VMs fork from it.
@Suite(.enabled(if: bootAvailable && FileManager.default.isReadableFile(atPath: guestDir + "/debian-12-systemd.tar")))
struct DefaultImageTests {
    @Test func theDefaultImageIsBuiltOnceAndForkedFrom() async throws {
        let h = try BuildHarness()
        let tarball = guestDir + "/debian-12-systemd.tar"
        let first = try await h.builds.defaultSnapshot(rootfsTarball: tarball)
        let second = try await h.builds.defaultSnapshot(rootfsTarball: tarball)
        #expect(first == second, "the second use reuses the ready snapshot")
        let builds = await h.builds.list()
        #expect(
            builds.count == 2 && builds[1].phases.map(\.name) == ["pull-image", "cached"],
            "\(builds.map { $0.phases.map(\.name) })")
        let seen = try await h.runInVM(from: first, ["systemctl is-system-running", "cat /etc/debian_version"])
        #expect(
            ["running", "degraded"].contains(seen[0].1), "a fork of the ready snapshot has systemd up at once: \(seen)")
        #expect(seen[1].1.hasPrefix("12."), "\(seen)")
        await #expect(throws: FurcateError.self) {
            try await h.builds.defaultSnapshot(rootfsTarball: h.tmp.sub("missing.tar"))
        }
        await h.tearDown()
    }
}

/// `furcate build` and `furcate run` as a user runs them (in-process mount, real VMs).
@Suite(.enabled(if: bootAvailable))
struct LocalCommandTests {
    /// Async, with each command waited for on a thread of its own: a command's boot waits for
    /// a host-wide boot slot that may be held by this test process's own VMs, whose slots are
    /// freed by tasks of the cooperative pool — a synchronous test blocking a pool thread (2 on
    /// this host) while it waits for the command deadlocked the run.
    @Test func buildThenRunFromTheSnapshot() async throws {
        let t = TempDir("cli-vm")
        let lay = t.sub("layout")
        try TestImage.twoLayerLayout(lay)
        let env = ["FURCATE_GUEST_DIR": guestDir]
        func sh(_ args: [String], env: [String: String]) async throws -> String {
            try await onThread("furcate-command") { try ImagesTests.sh(args, env: env) }
        }
        let out = try await sh(
            [
                furcateBinary, "build", "--data", t.sub("d"), "oci:\(lay):1", "--env", "FROM_BUILD=yes", "--run",
                "echo built > /marker", "--memory", "128",
            ], env: env)
        let snap = try #require(out.split(separator: "\n").last.map(String.init))
        #expect(snap.hasPrefix("sc-"), "\(out)")
        let ran = try await sh(
            [
                furcateBinary, "run", "--data", t.sub("d"), "--snapshot", snap, "--",
                "cat /marker; echo $FROM_BUILD $FURCATE_IMAGE_ENV",
            ], env: env)
        #expect(ran.hasSuffix("built\nyes from-the-image\n"), "\(ran)")
        // The command's status is the exit status.
        await #expect(throws: FurcateError.self) {
            try await sh([furcateBinary, "run", "--data", t.sub("d"), "--snapshot", snap, "--", "exit 7"], env: env)
        }
        let again = try await sh(
            [
                furcateBinary, "build", "--data", t.sub("d"), "oci:\(lay):1", "--env", "FROM_BUILD=yes", "--run",
                "echo built > /marker", "--memory", "128",
            ], env: env)
        #expect(again.contains("cached") && again.hasSuffix(snap + "\n"), "\(again)")
        let bad = try? await sh(
            [furcateBinary, "build", "--data", t.sub("d"), "oci:\(lay):1", "--run", "exit 3", "--memory", "128"],
            env: env)
        #expect(bad == nil, "a failed build fails the command")
        #expect(
            !(try String(contentsOfFile: "/proc/mounts", encoding: .utf8)).contains(t.sub("d")), "nothing left mounted")
    }
}
