import BlockStore
import Foundation
import FurcateCore
import StoreFS
import StoreServer
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Where a VM benchmark's store lives.
public enum BenchStoreHost: String, Codable, Sendable, CaseIterable {
    /// In the benchmark's own process, mounted on a thread of it (the layout before the
    /// storage process; what the CLI's one-shot commands still use).
    case local
    /// In a storage process (`furcate store serve`) reached over its control socket, as
    /// `furcate serve` has it.
    case process
}

/// What the VM benchmarks share: a fresh store in the work directory with the test rootfs
/// imported as `rootfs`, mounted (in this process or by a storage process), and a VM service
/// over it (debug shell on).
final class VMBenchEnvironment {
    let root: String
    /// The store as the VM service sees it.
    let store: any StoreAccess
    /// The store itself when it lives in this process.
    let localStore: BlockStore?
    let storeHost: BenchStoreHost
    private let mount: BackgroundMount?
    private let storage: StorageProcess?
    /// The VM service; a benchmark that lets one go and opens another over the same data
    /// directory (a new server's) puts the new one here, so that `close` uses it.
    var service: VMService
    /// The rootfs image's size (a warm pool's disk shape).
    let diskBytes: UInt64

    init(
        workDir: String, guestDir: String, name: String, storeHost: BenchStoreHost = .local,
        configure: (inout VMServiceOptions) -> Void
    ) throws {
        guard geteuid() == 0 else {
            throw FurcateError(.notPermitted, "bench \(name) needs root (it mounts the store)")
        }
        for a in ["vmlinuz", "initrd.img", "test-rootfs.ext4"] where access(guestDir + "/" + a, R_OK) != 0 {
            throw FurcateError(
                .notFound, "guest artifact missing (run scripts/guest-artifacts.sh)", path: guestDir + "/" + a)
        }
        root = workDir + "/furcate-bench-\(name)-\(getpid())"
        self.storeHost = storeHost
        let layout = DataLayout(root)
        try? FileManager.default.removeItem(atPath: root)
        try FileManager.default.createDirectory(atPath: layout.mountpoint, withIntermediateDirectories: true)
        let created = try BlockStore.create(at: layout.store)
        let image = guestDir + "/test-rootfs.ext4"
        switch storeHost {
        case .local:
            try created.importFile("rootfs", fromHostPath: image)
            try created.file("rootfs").sync()
            localStore = created
            store = created
            storage = nil
            mount = try StoreFS(store: created, mountpoint: layout.mountpoint).startInBackground()
        case .process:
            created.close()
            let p = try StorageProcess.attachOrStart(
                socketPath: layout.storeSocket, executable: DataLayout.executable,
                arguments: ["store", "serve", "--data", root], logPath: layout.storeLog)
            try p.client.importFile("rootfs", fromHostPath: image)
            localStore = nil
            store = p.client
            storage = p
            mount = nil
        }
        diskBytes = try store.fileSize("rootfs")
        service = try VMService(store: store, options: Self.options(root: root, guestDir: guestDir, configure))
    }

    /// The options of every VM service the environment opens.
    private static func options(root: String, guestDir: String, _ configure: (inout VMServiceOptions) -> Void)
        -> VMServiceOptions
    {
        let layout = DataLayout(root)
        var opts = VMServiceOptions(
            dataDirectory: layout.root + "/data", mountpoint: layout.mountpoint, guestDirectory: guestDir)
        opts.gracefulStopTimeout = .milliseconds(100)
        opts.debugShell = true
        opts.logger.logLevel = .warning
        // A benchmark asks for its N VMs on purpose: no vCPU limit, the host's memory limit.
        opts.capacity = VMCapacity(vcpus: nil, memoryMiB: VMCapacity.host(accelerator: opts.accelerator).memoryMiB)
        configure(&opts)
        return opts
    }

    /// A new VM service over the same store and data directory, as the next `furcate serve`
    /// opens it (the caller lets go of the old one first); it becomes `service`.
    func reopenService() throws -> VMService {
        service = try VMService(store: store, options: service.options)
        return service
    }

    /// Runs `body` in a new environment, closed afterwards whatever happens; returns its result
    /// and the seconds the whole took.
    static func run<R>(
        workDir: String, guestDir: String, name: String, storeHost: BenchStoreHost = .local,
        configure: (inout VMServiceOptions) -> Void, _ body: (VMBenchEnvironment) async throws -> R
    ) async throws -> (R, seconds: Double) {
        let t0 = ContinuousClock.now
        let env = try VMBenchEnvironment(
            workDir: workDir, guestDir: guestDir, name: name, storeHost: storeHost, configure: configure)
        do {
            let r = try await body(env)
            await env.close()
            return (r, millis(ContinuousClock.now - t0) / 1000)
        } catch {
            await env.close()
            throw error
        }
    }

    /// Deletes every VM, unmounts (stopping the storage process), removes the work directory.
    func close() async {
        await service.drainWarmPool()
        for vm in await service.list() { try? await service.delete(vm.id) }
        try? service.options.networks?.removeTable()
        mount?.stop()
        localStore?.close()
        await storage?.stop()
        try? FileManager.default.removeItem(atPath: root)
    }
}

/// Milliseconds of a duration.
func millis(_ d: Duration) -> Double {
    Double(d.components.seconds) * 1000 + Double(d.components.attoseconds) / 1e15
}
