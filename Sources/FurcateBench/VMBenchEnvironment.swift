import BlockStore
import Foundation
import FurcateCore
import StoreFS
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// What the VM benchmarks share: a fresh store in the work directory with the test rootfs
/// imported as `rootfs`, mounted in this process, and a VM service over it (debug shell on).
final class VMBenchEnvironment {
    let root: String
    let store: BlockStore
    let mount: BackgroundMount
    let service: VMService
    /// The rootfs image's size (a warm pool's disk shape).
    let diskBytes: UInt64

    init(workDir: String, guestDir: String, name: String, configure: (inout VMServiceOptions) -> Void) throws {
        guard geteuid() == 0 else {
            throw FurcateError(.notPermitted, "bench \(name) needs root (it mounts the store)")
        }
        for a in ["vmlinuz", "initrd.img", "test-rootfs.ext4"] where access(guestDir + "/" + a, R_OK) != 0 {
            throw FurcateError(
                .notFound, "guest artifact missing (run scripts/guest-artifacts.sh)", path: guestDir + "/" + a)
        }
        root = workDir + "/furcate-bench-\(name)-\(getpid())"
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: root + "/mnt", withIntermediateDirectories: true)
        store = try BlockStore.create(at: root + "/store")
        let rootfs = try store.createFile("rootfs")
        let image = guestDir + "/test-rootfs.ext4"
        let fd = try syscall("open", path: image) { open(image, O_RDONLY) }
        defer { Glibc.close(fd) }
        try FileTransfer.importFile(fd: fd, path: image, into: rootfs)
        try rootfs.sync()
        diskBytes = rootfs.size
        mount = try StoreFS(store: store, mountpoint: root + "/mnt").startInBackground()
        var opts = VMServiceOptions(dataDirectory: root + "/data", mountpoint: root + "/mnt", guestDirectory: guestDir)
        opts.gracefulStopTimeout = .milliseconds(100)
        opts.debugShell = true
        opts.logger.logLevel = .warning
        // A benchmark asks for its N VMs on purpose: no vCPU limit, the host's memory limit.
        opts.capacity = VMCapacity(vcpus: nil, memoryMiB: VMCapacity.host(accelerator: opts.accelerator).memoryMiB)
        configure(&opts)
        service = try VMService(store: store, options: opts)
    }

    /// Runs `body` in a new environment, closed afterwards whatever happens; returns its result
    /// and the seconds the whole took.
    static func run<R>(
        workDir: String, guestDir: String, name: String, configure: (inout VMServiceOptions) -> Void,
        _ body: (VMBenchEnvironment) async throws -> R
    ) async throws -> (R, seconds: Double) {
        let t0 = ContinuousClock.now
        let env = try VMBenchEnvironment(workDir: workDir, guestDir: guestDir, name: name, configure: configure)
        do {
            let r = try await body(env)
            await env.close()
            return (r, millis(ContinuousClock.now - t0) / 1000)
        } catch {
            await env.close()
            throw error
        }
    }

    /// Deletes every VM, unmounts, removes the work directory.
    func close() async {
        await service.drainWarmPool()
        for vm in await service.list() { try? await service.delete(vm.id) }
        mount.stop()
        store.close()
        try? FileManager.default.removeItem(atPath: root)
    }
}

/// Milliseconds of a duration.
func millis(_ d: Duration) -> Double {
    Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}
