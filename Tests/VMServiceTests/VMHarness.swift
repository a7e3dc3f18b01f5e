import BlockStore
import Foundation
import FurcateCore
import FurcateTestSupport
import Hypervisor
import StoreFS
import Testing
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Where scripts/guest-artifacts.sh put the kernel, initramfs and test rootfs.
let guestDir =
    ProcessInfo.processInfo.environment["FURCATE_GUEST_DIR"]
    ?? (NSHomeDirectory() + "/.local/share/furcate/guest")

/// Why VM tests cannot run here, or nil when they can.
let vmUnavailable: String? = {
    if access("/dev/fuse", R_OK | W_OK) != 0 { return "/dev/fuse is not usable" }
    if geteuid() != 0 { return "mounting needs root" }
    if access(QEMUProcess.binary, X_OK) != 0 { return "\(QEMUProcess.binary) is not installed" }
    for a in ["vmlinuz", "initrd.img", "test-rootfs.ext4", "furcate-agent"] where access(guestDir + "/" + a, R_OK) != 0
    {
        return "\(guestDir)/\(a) is missing (scripts/guest-artifacts.sh builds it)"
    }
    return nil
}()

let vmAvailable = facilityAvailable("VM tests", unavailable: vmUnavailable)

/// A store mounted in this process (as `furcate serve` does), the test rootfs imported as the
/// file `rootfs`, and a VM service over it. `restart()` replaces the service as a restarted
/// server would, keeping store and mount.
final class VMHarness: @unchecked Sendable {
    let tmp = TempDir("vm")
    let store: BlockStore
    let mount: BackgroundMount
    let warmPool: Int
    let configure: @Sendable (inout VMServiceOptions) -> Void
    private(set) var service: VMService
    var mountpoint: String { tmp.sub("mnt") }

    /// - Parameter storeDirectory: where the store is created (default: in the harness's
    ///   temporary directory).
    init(
        warmPool: Int = 0, storeDirectory: String? = nil,
        configure: @escaping @Sendable (inout VMServiceOptions) -> Void = { _ in }
    ) throws {
        self.warmPool = warmPool
        self.configure = configure
        try FileManager.default.createDirectory(atPath: tmp.sub("mnt"), withIntermediateDirectories: true)
        store = try BlockStore.create(at: storeDirectory ?? tmp.sub("store"))
        let rootfs = try store.createFile("rootfs")
        let fd = open(guestDir + "/test-rootfs.ext4", O_RDONLY)
        defer { close(fd) }
        try FileTransfer.importFile(fd: fd, path: guestDir + "/test-rootfs.ext4", into: rootfs)
        try rootfs.sync()
        mount = try StoreFS(store: store, mountpoint: tmp.sub("mnt")).startInBackground()
        service = try VMService(store: store, options: Self.options(tmp, warmPool: warmPool, configure))
    }

    static func options(_ tmp: TempDir, warmPool: Int = 0, _ configure: (inout VMServiceOptions) -> Void = { _ in })
        -> VMServiceOptions
    {
        var o = VMServiceOptions(dataDirectory: tmp.sub("data"), mountpoint: tmp.sub("mnt"), guestDirectory: guestDir)
        o.gracefulStopTimeout = .milliseconds(300)
        o.defaultMemoryMiB = 128
        o.warmPoolSize = warmPool
        o.debugShell = true
        configure(&o)
        return o
    }

    /// A new service over the same data directory, as after a server restart.
    func restart() throws {
        service = try VMService(store: store, options: Self.options(tmp, warmPool: warmPool, configure))
    }

    /// Kills every VM still known, unmounts, closes the store. Returns the names of the store
    /// files left once the VMs were deleted.
    @discardableResult
    func tearDown() async -> [String] {
        await service.drainWarmPool()
        for vm in await service.list() { try? await service.delete(vm.id) }
        let left = (try? store.list().map(\.name)) ?? []
        defer { store.close() }
        mount.stopChecked()
        return left
    }
}

/// Runs `cmd` in the guest and returns its trimmed output; records a failure on non-zero exit.
@discardableResult
func guest(_ shell: GuestShell, _ cmd: String, sourceLocation: SourceLocation = #_sourceLocation) async throws -> String
{
    let (out, status) = try await shell.run(cmd)
    #expect(status == 0, "guest command failed (\(status)): \(cmd): \(out)", sourceLocation: sourceLocation)
    return out.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// A guest command listing the test image's agent processes (supervisor and server), one pid a
/// line — not the one serving the debug shell (`--shell-on`).
let agentPIDs = "for p in $(pidof agent); do grep -q -- --shell-on /proc/$p/cmdline || echo $p; done"

/// True when a process with this pid exists.
func processExists(_ pid: Int32) -> Bool { kill(pid, 0) == 0 || errno == EPERM }

/// What a VM's logs and QEMU say, for a failure message.
func diagnose(_ svc: VMService, _ id: String) async -> String {
    let run = svc.runDirectory(id)
    var s = "VM \(id): "
    if let p = await svc.process(id), let st = try? await p.qmp.execute("query-status", timeout: .seconds(2)) {
        s += "status \(st); "
    }
    s += "console: " + QEMUProcess.logTail(run + "/console.log", lines: 8)
    s += " | qemu: " + QEMUProcess.logTail(run + "/qemu.log", lines: 5)
    return s
}

/// Runs `body` with a fresh harness and its service; an error it throws is recorded as the
/// test's failure; the harness is torn down either way. Returns the store files left after
/// the VMs were deleted.
@discardableResult
func withHarness(
    warmPool: Int = 0, configure: @escaping @Sendable (inout VMServiceOptions) -> Void = { _ in },
    sourceLocation: SourceLocation = #_sourceLocation, _ body: (VMHarness, VMService) async throws -> Void
) async -> [String] {
    let h: VMHarness
    do { h = try VMHarness(warmPool: warmPool, configure: configure) } catch {
        Issue.record(error, sourceLocation: sourceLocation)
        return []
    }
    do { try await body(h, h.service) } catch {
        // What each VM's console, QEMU and QMP said, to tell a hung guest from a slow one.
        var report = "\(error)"
        for vm in await h.service.list() { report += "\n  \(vm.state.rawValue): \(await diagnose(h.service, vm.id))" }
        Issue.record(Comment(rawValue: report), sourceLocation: sourceLocation)
    }
    return await h.tearDown()
}
