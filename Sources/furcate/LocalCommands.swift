import Accounts
import ArgumentParser
import BlockStore
import Builds
import Dispatch
import Foundation
import FurcateCore
import FurcateEngine
import GuestAgentProtocol
import Images
import StoreFS
import StoreServer
import Synchronization
import VMNetwork
import VMService

#if canImport(Glibc)
    import Glibc
#endif

/// Where a `LocalEngine`'s store lives.
enum StoreHost {
    /// In this process, with its mount on a thread of ours (the CLI's one-shot commands).
    case inProcess(BlockStore, BackgroundMount)
    /// In the data directory's storage process (`furcate serve`): it outlives this one.
    case storageProcess(StorageProcess)
}

/// The engine over a data directory: store, mount, images, VMs, builds. (`furcate serve` runs
/// the same parts as services, with the store in the storage process.)
final class LocalEngine: @unchecked Sendable {
    let layout: DataLayout
    let host: StoreHost
    let images: ImageService
    let vms: VMService
    let builds: BuildService

    /// - Parameter warmPool: QEMUs kept waiting per machine shape (0: none).
    /// - Parameter capacity: guest vCPUs and memory admitted at once (nil: the host's default).
    /// - Parameter concurrentBoots: cold boots at once on the host (nil: the host's default).
    /// - Parameter storageProcess: use (starting it when none runs) the data directory's
    ///   storage process instead of opening the store here.
    init(
        _ data: DataOption, warmPool: Int = 0, capacity: VMCapacity? = nil, concurrentBoots: Int? = nil,
        storageProcess: Bool = false, snapshotCompression: SnapshotCompression? = nil, networks: NetworkHost? = nil,
        egress: EgressPolicy = .allowPublicInternet
    ) throws {
        guard geteuid() == 0 else {
            throw FurcateError(.notPermitted, "this command mounts the store and runs VMs: run it as root")
        }
        layout = data.layout
        let l = layout
        guard FileManager.default.isReadableFile(atPath: l.agent) else {
            throw FurcateError(
                .notFound,
                "no guest agent in \(l.guestCandidates.joined(separator: " or ")): run scripts/setup.sh first "
                    + "(or set FURCATE_GUEST_DIR to where the guest artifacts are)")
        }
        try FileManager.default.createDirectory(atPath: l.root, withIntermediateDirectories: true)
        if storageProcess {
            // The data directory on its command line: `ps` (and the tests) see whose it is.
            let args = ["store", "serve", "--data", l.root]
            host = .storageProcess(
                try StorageProcess.attachOrStart(
                    socketPath: l.storeSocket, executable: DataLayout.executable, arguments: args,
                    logPath: l.storeLog))
        } else {
            let store = try data.openOrCreateStore()
            do {
                try FileManager.default.createDirectory(atPath: l.mountpoint, withIntermediateDirectories: true)
                host = .inProcess(store, try StoreFS(store: store, mountpoint: l.mountpoint).startInBackground())
            } catch {
                store.close()
                throw error
            }
        }
        let store: any StoreAccess =
            switch host {
            case .inProcess(let s, _): s
            case .storageProcess(let p): p.client
            }
        do {
            images = try ImageService(
                store: store, options: ImageServiceOptions(directory: l.images, agentPath: l.agent))
            var vmOptions = VMServiceOptions(dataDirectory: l.vms, mountpoint: l.mountpoint, guestDirectory: l.guest)
            vmOptions.warmPoolSize = warmPool
            vmOptions.capacity = capacity
            vmOptions.concurrentBoots = concurrentBoots
            vmOptions.snapshotCompression = snapshotCompression
            vmOptions.networks = networks
            vmOptions.egress = egress
            vms = try VMService(store: store, options: vmOptions)
            builds = try BuildService(
                images: images, vms: vms, options: BuildServiceOptions(directory: l.root + "/builds"))
        } catch {
            Self.release(host)
            throw error
        }
    }

    /// The use-case layer over these services, with the data directory's keys and owner
    /// catalogue (the same ones `furcate serve` uses).
    func engine(quotaBytes: UInt64? = nil) throws -> Engine {
        Engine(
            vms: vms, images: images, builds: builds, keys: try KeyStore(path: layout.keys),
            owners: try OwnerStore(path: layout.root + "/owners.sqlite"),
            defaultImage: layout.guest + "/debian-12-systemd.tar", quotaBytes: quotaBytes)
    }

    /// Ends VMs this process started, then unmounts and closes the store (in this process) or
    /// lets go of the storage process (stopping it when `stopStorage`: it then unmounts and
    /// closes the store itself).
    func close(deleting vmIDs: [String], stopStorage: Bool = true) async {
        for id in vmIDs { try? await vms.delete(id) }
        if case .storageProcess(let p) = host, stopStorage {
            await p.stop()
            return
        }
        Self.release(host)
    }

    private static func release(_ host: StoreHost) {
        switch host {
        case .inProcess(let store, let mount):
            mount.stop()
            store.close()
        case .storageProcess(let p):
            p.client.disconnect()
        }
    }

    /// SIGINT/SIGTERM end the command cleanly (VMs deleted, store unmounted) with status 130.
    func onInterrupt(_ cleanup: @escaping @Sendable () async -> Void) -> [DispatchSourceSignal] {
        [SIGINT, SIGTERM].map { sig in
            signal(sig, SIG_IGN)
            let s = DispatchSource.makeSignalSource(signal: sig, queue: .global())
            s.setEventHandler {
                Task {
                    await cleanup()
                    exit(130)
                }
            }
            s.resume()
            return s
        }
    }
}

/// `furcate build`: an image plus steps, run in a build VM and snapshotted (cached by hash).
struct BuildCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "build",
        abstract:
            "Build a snapshot from an image: boot it, run steps through the agent, snapshot (cached by template hash). Prints the snapshot id last."
    )
    @OptionGroup var data: DataOption
    @Argument(
        help:
            "Base image (registry ref, oci:DIR[:TAG], docker-archive:FILE, rootfs:FILE), or 'default' for Debian 12 with systemd."
    )
    var image: String
    @Option(name: .customLong("apt"), help: "apt packages (repeatable).") var apt: [String] = []
    @Option(name: .customLong("pip"), help: "pip packages (repeatable).") var pip: [String] = []
    @Option(name: .customLong("env"), help: "KEY=VALUE for the snapshot's processes (repeatable).") var env: [String] =
        []
    @Option(
        name: .customLong("run"), help: "A shell command run in the build VM, in order after the packages (repeatable)."
    ) var runCommands: [String] = []
    @Option(help: "Build VM memory in MiB.") var memory: Int?
    @Flag(help: "Build even when a cached snapshot exists.") var skipCache = false
    @Flag(help: "Print the build record as JSON.") var json = false

    func validate() throws {
        for e in env where !e.contains("=") || e.hasPrefix("=") {
            throw ValidationError("--env takes KEY=VALUE, not '\(e)'")
        }
    }

    func run() throws {
        bootstrapOnce
        let (data, image, apt, pip, env, run, memory, skipCache, json) = (
            data, image, apt, pip, env, runCommands, memory, skipCache, json
        )
        try runBlocking {
            let engine = try LocalEngine(data)
            let signals = engine.onInterrupt { await engine.close(deleting: await engine.vms.list().map(\.id)) }
            defer { _ = signals }
            do {
                var steps: [BuildStep] = []
                if !apt.isEmpty { steps.append(.apt(apt.flatMap { $0.split(separator: " ").map(String.init) })) }
                if !pip.isEmpty { steps.append(.pip(pip.flatMap { $0.split(separator: " ").map(String.init) })) }
                if !env.isEmpty {
                    steps.append(
                        .env(
                            Dictionary(
                                env.map { e in
                                    let i = e.firstIndex(of: "=") ?? e.endIndex
                                    return (String(e[..<i]), String(e[i...].dropFirst()))
                                }
                            ) { $1 }))
                }
                steps += run.map { .run(command: $0) }
                let cases = try engine.engine()
                let recipe = cases.localRecipe(
                    base: image == "default" ? .defaultImage : .image(image), steps: steps, memoryMiB: memory,
                    skipCache: skipCache)
                let r = try await cases.buildLocally(recipe) { started in
                    FileHandleStderr.write(
                        "build \(started.buildId): \(started.plannedPhases.joined(separator: " → "))\n")
                } phaseEnded: { p in
                    FileHandleStderr.write("  \(p.name)\(p.snapshotId.map { " (\($0))" } ?? "")\n")
                }
                await engine.close(deleting: [])
                if json { try printJSON(r) }
                guard r.state == .succeeded, let snap = r.snapshotId else {
                    throw FurcateError(
                        .buildFailed, "build \(r.buildId) failed: \(r.failureReason ?? "unknown reason")")
                }
                if !json { print(snap) }
            } catch {
                await engine.close(deleting: await engine.vms.list().map(\.id))
                throw error
            }
        }
    }
}

/// `furcate run`: boot a VM from an image or snapshot, run one command through the agent,
/// print its output, delete the VM; the exit status is the command's.
struct RunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "run",
        abstract:
            "Boot a VM (image or snapshot), run a command in it through the agent, print its output, delete the VM.")
    @OptionGroup var data: DataOption
    @Option(help: "Image to boot (as for `furcate image pull`).") var image: String?
    @Option(help: "Snapshot to restore (sc-…, from `furcate build`).") var snapshot: String?
    @Option(help: "Memory in MiB (images only).") var memory: Int?
    @Option(help: "Seconds the command may run.") var timeout = 600
    @Argument(parsing: .captureForPassthrough, help: "The command (run by /bin/sh -c when one word, else as argv).")
    var command: [String]

    func validate() throws {
        guard (image == nil) != (snapshot == nil) else { throw ValidationError("give one of --image or --snapshot") }
        guard !command.filter({ $0 != "--" }).isEmpty else { throw ValidationError("give a command to run") }
    }

    func run() throws {
        bootstrapOnce
        let (data, image, snapshot, memory, timeout) = (data, image, snapshot, memory, timeout)
        let argv = command.first == "--" ? Array(command.dropFirst()) : command
        let status = Mutex<Int32>(0)
        try runBlocking {
            let local = try LocalEngine(data)
            let signals = local.onInterrupt { await local.close(deleting: await local.vms.list().map(\.id)) }
            defer { _ = signals }
            var created: [String] = []
            do {
                // Through the engine, as `furcate serve` would: the VM is the local account's
                // while it runs, and forgotten whole at the end.
                let engine = try local.engine()
                var req = CreateVMRequest(memoryMiB: memory)
                if let image {
                    req.image = try await engine.images.pull(image).storeFile
                } else {
                    req.snapshot = snapshot
                }
                let policy = VMPolicy(persistence: .persistent)
                let vm = try await engine.createVM(NewVM(account: Engine.localAccount, machine: req, policy: policy))
                created.append(vm.id)
                _ = try await engine.vms.agent(vm.id, timeout: .seconds(120))  // booted
                let e =
                    argv.count == 1
                    ? ExecRequest(command: argv[0], timeoutMs: timeout * 1000)
                    : ExecRequest(argv: argv, timeoutMs: timeout * 1000)
                let r = try await engine.guest(try await engine.vms.info(vm.id), wake: .requireRunning).exec(e)
                FileHandle.standardOutput.write(r.stdout)
                FileHandle.standardError.write(r.stderr)
                if r.timedOut { FileHandleStderr.write("furcate: the command timed out after \(timeout) s\n") }
                status.withLock { $0 = r.timedOut ? 124 : (r.exitCode ?? (128 + (r.signal ?? 9))) }
                for id in created { try? await engine.forgetVM(id) }
                await local.close(deleting: created)
            } catch {
                if let engine = try? local.engine() { for id in created { try? await engine.forgetVM(id) } }
                await local.close(deleting: created)
                throw error
            }
        }
        let s = status.withLock { $0 }
        if s != 0 { throw ExitCode(s) }
    }
}
