// VMService — the VM lifecycle: boot from an image file, snapshot, fork, suspend/resume,
// stop/kill, persisted in SQLite so a restarted server finds its VMs again.
//
// Neighbours: BlockStore (below) holds every VM's RAM, disk and device state as store files;
// the store is mounted by StoreFS in the same process, so QEMU (through Hypervisor) opens them
// as ordinary files in the mount. A snapshot is three O(1) store snapshots; a fork is O(1)
// store clones plus a QEMU restore. The API layer above maps these calls to HTTP.
import BlockStore
import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor
import Logging
import VMNetwork

#if canImport(Glibc)
    import Glibc
#endif

/// Tunables of the VM service.
public struct VMServiceOptions: Sendable {
    /// Holds `vms.sqlite` and `run/ID/` (QMP and channel sockets, console and QEMU logs).
    public var dataDirectory: String
    /// Where the store is mounted (StoreFS): QEMU opens `files/…` and `snapshots/…` there.
    public var mountpoint: String
    /// `vmlinuz` and `initrd.img` (scripts/guest-artifacts.sh).
    public var guestDirectory: String
    /// KVM where it can run a guest, else TCG.
    public var accelerator: Accelerator = .detect()
    /// Memory mode of forks (a boot is always mode a: a fresh VM has no base to share).
    public var forkMemoryMode: MemoryMode = .shared
    /// Guest RAM of a boot that names none.
    public var defaultMemoryMiB = 256
    /// vCPUs of a boot that names none.
    public var defaultVCPUs = 1
    /// Block size of memory files. Guests dirty RAM in 4 KiB pages; see docs/BENCHMARKS.md.
    public var memoryBlockSize = 64 << 10
    /// How long a graceful stop waits for the guest to power off before QEMU is ended.
    public var gracefulStopTimeout: Duration = .seconds(5)
    /// Give every VM a debug-shell port (`furcate.shell`) besides the agent's (test images
    /// serve a shell there; `guestShell` connects to it).
    public var debugShell = false
    /// Every VM gets a NIC on QEMU's user-mode network (outbound access through the host, as
    /// builds need for apt and pip). Service-wide, like `debugShell`: snapshots restore only
    /// into machines with the same devices.
    public var network = true
    /// With `network`: give every VM a network of its own (VMNetwork: a namespace, a veth pair,
    /// a tap device, the policy in nftables) instead of QEMU's user-mode network. Nil: user
    /// mode.
    public var networks: NetworkHost?
    /// The egress policy of a VM network (with `networks`).
    public var egress = EgressPolicy.allowPublicInternet
    /// How long the freshening of a restored VM (see `awaitFreshened`) waits for its agent, in
    /// time its QEMU could run (time spent waiting for a CPU on a loaded host does not count;
    /// see `Deadline`). An image without an agent still runs; the restore then logs that its
    /// fork shares its siblings' RNG state until the kernel reseeds by itself.
    public var agentTimeout: Duration = .seconds(10)
    /// Cold boots under way at once across every Furcate process of the host (a boot holds a
    /// slot from QEMU's start until its guest agent first answers): a TCG boot keeps a core
    /// busy for seconds, and seven at once on two cores made each take minutes. nil: the
    /// host's default (`VMService.defaultConcurrentBoots`); later boots wait their turn.
    public var concurrentBoots: Int?
    /// Where the host-wide boot slots live (`HostSlots`; every process using it shares them).
    public var slotDirectory = HostSlots.defaultDirectory
    /// How long a boot holds its slot at most waiting for the guest agent, in run time.
    public var bootTimeout: Duration = .seconds(120)
    /// QEMUs kept waiting per machine shape so a mode-a restore skips process start (0: none).
    public var warmPoolSize = 0
    /// The memory compression every new snapshot (not a suspend's) gets in the background
    /// (nil: none); `setSnapshotCompression` changes one snapshot's.
    public var snapshotCompression: SnapshotCompression?
    /// Free space a snapshot leaves on the store's filesystem for the running VMs' own writes:
    /// a snapshot that could take the filesystem below it is refused before it writes
    /// anything (`.diskFull`). Without the floor, one snapshot's write-back of guest RAM can
    /// take the last bytes, and every VM whose next disk write then fails is paused by QEMU.
    public var snapshotReserveBytes: UInt64 = 64 << 20
    /// Guest vCPUs and memory admitted at once (nil: `VMCapacity.host` for `accelerator`).
    public var capacity: VMCapacity?
    /// How long QEMU may take to answer QMP after spawn.
    public var startTimeout: Duration = .seconds(20)
    /// The QEMU binary (default: `FURCATE_QEMU`, else qemu-system-x86_64 on the usual paths).
    public var qemuBinary: String = QEMUProcess.binary
    /// Where the service logs (label `furcate.vm`).
    public var logger = Logger(label: "furcate.vm")

    /// Options for a service keeping its data in `dataDirectory`, with the store mounted at
    /// `mountpoint` and the kernel and initramfs in `guestDirectory`; the rest take the defaults
    /// above.
    public init(dataDirectory: String, mountpoint: String, guestDirectory: String) {
        self.dataDirectory = dataDirectory
        self.mountpoint = mountpoint
        self.guestDirectory = guestDirectory
    }
}

/// What to boot or restore.
public struct CreateVMRequest: Sendable {
    /// A store file or snapshot holding an ext4 root filesystem (cloned, never changed).
    public var image: String?
    /// Restore this snapshot instead of booting an image.
    public var snapshot: String?
    /// Guest RAM; nil: the image boot's default, or the snapshot's.
    public var memoryMiB: Int?
    /// vCPUs; nil: the image boot's default, or the snapshot's.
    public var vcpus: Int?
    /// Memory mode of a restore (nil: the service's fork default).
    public var memoryMode: MemoryMode?
    /// What the guest may reach; nil: the snapshot's policy on a restore, the service's
    /// default on a boot. Needs `VMServiceOptions.networks` (user-mode networking enforces none).
    public var egress: EgressPolicy?

    /// A boot of `image`, or with `snapshot` a restore of it.
    public init(
        image: String? = nil, snapshot: String? = nil, memoryMiB: Int? = nil, vcpus: Int? = nil,
        memoryMode: MemoryMode? = nil, egress: EgressPolicy? = nil
    ) {
        self.image = image
        self.snapshot = snapshot
        self.memoryMiB = memoryMiB
        self.vcpus = vcpus
        self.memoryMode = memoryMode
        self.egress = egress
    }
}

/// How long each step of one restore took (fork and resume report them; the benchmark
/// aggregates them).
public struct RestoreTiming: Sendable, Codable {
    /// Cloning the snapshot's files in the store.
    public var storeClone: Duration = .zero
    /// Starting QEMU (or taking a warm one from the pool) until QMP answers.
    public var spawn: Duration = .zero
    /// Device state in, up to QEMU's MIGRATION `completed` event; QEMU starts the guest just
    /// before that event.
    public var migrateIncoming: Duration = .zero
    /// A QMP `cont`: only for streams saved with the paused run state (earlier versions).
    public var resume: Duration = .zero
    /// The whole restore.
    public var total: Duration { storeClone + spawn + migrateIncoming + resume }
}

/// The result of a fork: the new VMs, the snapshot they came from, and their timings.
public struct ForkResult: Sendable {
    /// The snapshot the forks were restored from.
    public var snapshot: SnapshotInfo
    /// How long taking that snapshot took.
    public var snapshotDuration: Duration
    /// The forks, in order.
    public var vms: [VMInfo]
    /// Each fork's restore, in the same order.
    public var timings: [RestoreTiming]
}

/// The VM lifecycle service. Operations on one VM are serialized (an `AsyncLock` per VM);
/// operations on different VMs run concurrently.
public actor VMService {
    /// The store VMs' disks and memory live in.
    public nonisolated let store: any StoreAccess
    /// What the service was made with.
    public nonisolated let options: VMServiceOptions
    let db: VMDatabase
    var vms: [String: VMInfo] = [:] {
        didSet { listed = nil }
    }
    /// `vms` oldest first, kept until `vms` changes (listing 1,000 VMs sorted them on every
    /// request, on this actor: `furcate bench api`).
    private var listed: [VMInfo]?
    var snapshots: [String: SnapshotInfo] = [:]
    /// The runtime of every VM with a QEMU, pooled ones included (VMInstance.swift).
    var instances: [String: VMInstance] = [:]
    /// Serializes operations on one VM; kept while the VM is known, process or not.
    var locks: [String: AsyncLock] = [:]
    /// Serializes creation of a snapshot's mode-b base file.
    let baseLock = AsyncLock()
    /// Cold boots under way on this host (`VMServiceOptions.concurrentBoots`).
    nonisolated let bootSlots: HostSlots
    /// Snapshot memory (re)compressions in progress (VMService+Compression.swift).
    var compressionJobs: [String: (task: Task<Void, Never>, cancel: CancelFlag)] = [:]
    /// Warm pool (VMService+WarmPool.swift).
    var pool: [PoolShape: [PoolEntry]] = [:]
    /// The VM network of each VM and pooled QEMU (with `options.networks`), by id.
    var networkIndexes: [String: Int] = [:]
    /// Whether the host's table was made (by `recover`, or the first network's launch).
    var networksPrepared = false
    var refilling: Set<PoolShape> = []
    /// Whether refills may start QEMUs: `drainWarmPool` stops them until `prewarm`,
    /// `shutdown` for good.
    var poolGate = PoolGate.open
    nonisolated var logger: Logger { options.logger }
    /// What this service admits (`options.capacity`, else the host's default).
    public nonisolated let capacity: VMCapacity
    /// Admitted VMs not yet counted by their state (VMService+Capacity.swift).
    var admitting = VMCapacity.Demand.zero

    /// Opens (or creates) the VM database in `options.dataDirectory`.
    /// - Throws: `.io` when the data directory or database cannot be used.
    public init(store: any StoreAccess, options: VMServiceOptions) throws {
        self.store = store
        self.options = options
        capacity = options.capacity ?? .host(accelerator: options.accelerator)
        bootSlots = HostSlots(
            name: "boot", count: options.concurrentBoots ?? Self.defaultConcurrentBoots(options.accelerator),
            directory: options.slotDirectory)
        // Unix socket paths (QMP, the guest channel, migration) live in run/<20-char id>/ and
        // must fit sockaddr_un's 108 bytes: refuse a data directory too deep, saying so.
        let longest = options.dataDirectory + "/run/" + String(repeating: "x", count: 20) + "/migrate.sock"
        guard longest.utf8.count < 108 else {
            throw FurcateError(
                .invalidArgument,
                "the VM data directory is too deep for unix sockets (\(longest.utf8.count) bytes of 107 for its socket paths); use a shorter path",
                path: options.dataDirectory)
        }
        do {
            try FileManager.default.createDirectory(
                atPath: options.dataDirectory + "/run", withIntermediateDirectories: true)
        } catch {
            throw FurcateError(
                .io, "cannot create the data directory", path: options.dataDirectory,
                underlying: UnderlyingMessage(error))
        }
        db = try VMDatabase(path: options.dataDirectory + "/vms.sqlite")
        for vm in try db.vms() {
            vms[vm.id] = vm
            if let i = vm.networkIndex { networkIndexes[vm.id] = i }
        }
        for s in try db.snapshots() { snapshots[s.id] = s }
    }

    // MARK: queries

    /// - Throws: `.notFound`.
    public func info(_ id: String) throws -> VMInfo {
        guard let vm = vms[id] else { throw FurcateError(.notFound, "no VM \(id)") }
        return vm
    }

    /// Every VM, oldest first.
    public func list() -> [VMInfo] {
        if let listed { return listed }
        let sorted = vms.values.sorted { ($0.createdAt, $0.id) < ($1.createdAt, $1.id) }
        listed = sorted
        return sorted
    }

    /// - Throws: `.notFound`.
    public func snapshotInfo(_ id: String) throws -> SnapshotInfo {
        guard let s = snapshots[id] else { throw FurcateError(.notFound, "no snapshot \(id)") }
        return s
    }

    /// Every snapshot, oldest first.
    public func listSnapshots() -> [SnapshotInfo] { snapshots.values.sorted { $0.createdAt < $1.createdAt } }

    /// The QEMU process of a running VM (tests and benchmarks look at it).
    public func process(_ id: String) -> QEMUProcess? { instances[id]?.process }

    /// The ids of VMs that have a runtime (a QEMU, pooled ones included): what tests look at
    /// to see that every ending path tore one down.
    public func instanceIDs() -> Set<String> { Set(instances.keys) }

    /// The run directory of a VM: its sockets and logs.
    public nonisolated func runDirectory(_ id: String) -> String { options.dataDirectory + "/run/" + id }

    /// The debug shell of a running VM (`debugShell`; see `GuestShell`), waiting up to `timeout`
    /// of time the VM's QEMU could run.
    /// - Throws: `.invalidState` unless running or without a debug shell, `.timedOut`.
    public func guestShell(_ id: String, timeout: Duration = .seconds(30)) async throws -> GuestShell {
        let vm = try info(id)
        guard vm.state == .running else {
            throw FurcateError(.invalidState, "VM \(id) is \(vm.state.rawValue), not running")
        }
        guard options.debugShell else { throw FurcateError(.invalidState, "VMs of this service have no debug shell") }
        // In time its QEMU could run: a loaded host's guest gets its chance to answer.
        let deadline: Deadline = instances[id].map { .runTime(timeout, of: $0.process.pid) } ?? .after(timeout)
        return try await GuestShell(socket: runDirectory(id) + "/shell.sock", deadline: deadline)
    }

    /// Waits until a VM's guest is ready — booted: its agent answered; restored: freshened
    /// (RNG reseeded, clock set, identity if asked) — and says whether its agent did it. True at
    /// once for a VM with nothing under way.
    public func awaitFreshened(_ id: String) async -> Bool {
        guard let f = instances[id]?.readiness else { return true }
        return await f.task.value
    }

    /// Waits for a restored VM's freshening. One that gave up (its agent answered too late —
    /// many forks restored at once on a small host take longer than `agentTimeout`) is tried
    /// again first, within `timeout`: nothing of the user's reaches a fork that still shares
    /// its RNG state with its siblings.
    /// - Throws: `.timedOut` when the retry fails too.
    func ensureFreshened(_ id: String, timeout: Duration) async throws {
        while let f = instances[id]?.readiness {
            if await f.task.value { return }
            guard instances[id]?.readiness?.task == f.task else { continue }  // another caller retries: wait for theirs
            let v = try info(id)
            let retry = Task { await self.readyGuest(v, f.work, timeout: timeout) }
            instances[id]?.readiness = GuestReadiness(task: retry, work: f.work)
            if await retry.value { return }
            switch f.work {
            case .boot:
                throw FurcateError(
                    .timedOut,
                    "VM \(id) was booted, but its guest agent has not answered yet (within \(timeout) of run time); try again"
                )
            case .restore:
                throw FurcateError(
                    .timedOut,
                    "VM \(id) was restored, but its guest agent has not reseeded its RNG and set its clock yet (no answer within \(timeout)); try again"
                )
            }
        }
    }

    /// A connection to a running VM's guest agent, once it answers (and, after a restore, once
    /// the VM was freshened: nothing of the user's reaches a fork before its RNG is reseeded).
    /// - Throws: `.invalidState` unless running, `.timedOut`.
    public func agent(_ id: String, timeout: Duration = .seconds(30)) async throws -> AgentClient {
        try await ensureFreshened(id, timeout: timeout)
        let vm = try info(id)
        guard vm.state == .running else {
            throw FurcateError(.invalidState, "VM \(id) is \(vm.state.rawValue), not running")
        }
        guard let process = instances[id]?.process else { throw FurcateError(.invalidState, "VM \(id) has no process") }
        if let c = instances[id]?.agent, c.isOpen { return c }
        let c = try await connectAgent(id, process: process, timeout: timeout)
        if let raced = instances[id]?.agent, raced.isOpen {  // another caller connected meanwhile
            c.close()
            return raced
        }
        guard instances[id]?.process === process else {  // its QEMU ended meanwhile
            c.close()
            throw FurcateError(.invalidState, "VM \(id) stopped while its guest agent was being reached")
        }
        instances[id]?.agent = c
        return c
    }

    // MARK: create

    /// Boots a VM from an image, or restores one from a snapshot. Returns once it runs.
    /// - Throws: `.invalidArgument` (neither or both of image and snapshot, bad sizes),
    ///   `.notFound` (image or snapshot), `.io`/`.hypervisor`/`.timedOut` when QEMU fails —
    ///   then nothing of the VM is left behind.
    public func create(_ request: CreateVMRequest) async throws -> VMInfo {
        if let e = request.egress { try checkEgress(e) }
        switch (request.image, request.snapshot) {
        case (let image?, nil):
            return try await boot(
                image: image, memoryMiB: request.memoryMiB ?? options.defaultMemoryMiB,
                vcpus: request.vcpus ?? options.defaultVCPUs, egress: request.egress)
        case (nil, let snap?):
            let s = try snapshotInfo(snap)
            if let m = request.memoryMiB, m != s.memoryMiB {
                throw FurcateError(
                    .invalidArgument, "snapshot \(snap) has \(s.memoryMiB) MiB of memory; a restore cannot change it")
            }
            let mode = request.memoryMode ?? options.forkMemoryMode
            defer { refillPoolSoon(for: s, mode: mode) }
            return try await restoreNew(s, mode: mode, egress: request.egress).0
        default:
            throw FurcateError(.invalidArgument, "give either an image or a snapshot to create a VM from")
        }
    }

    private func boot(image: String, memoryMiB: Int, vcpus: Int, egress: EgressPolicy?) async throws -> VMInfo {
        guard (16...(1 << 20)).contains(memoryMiB) else {
            throw FurcateError(.invalidArgument, "memory must be 16 MiB to 1 TiB, not \(memoryMiB) MiB")
        }
        guard (1...64).contains(vcpus) else {
            throw FurcateError(.invalidArgument, "vCPUs must be 1 to 64, not \(vcpus)")
        }
        _ = try store.fileSize(image)  // .notFound before anything is made
        let demand = VMCapacity.Demand(vcpus: vcpus, memoryMiB: memoryMiB)
        try admit(demand, operation: "booting a VM")
        defer { settle(demand) }
        // Held until the guest agent first answers (see `concurrentBoots`); waits its turn.
        let slot = try await bootSlots.acquire()
        var vm = VMInfo(
            id: VMID.newVM(), state: .starting, memoryMiB: memoryMiB, vcpus: vcpus, memoryMode: .shared,
            parentSnapshot: nil, suspendedSnapshot: nil, pid: nil, resumeOnStart: false,
            createdAt: Date().timeIntervalSince1970)
        vm.egress = egress
        do {
            try store.cloneFile(image, to: vm.diskFile)
            try await coldBoot(&vm, slot: slot)
            logger.info(
                "booted",
                metadata: [
                    "vm.id": "\(vm.id)", "vm.image": "\(image)", "vm.pid": "\(vm.pid ?? 0)",
                    "vm.boot_slot": "\(slot.index)",
                ])
            return vm
        } catch {
            slot.release()
            await discardFailed(vm)
            throw error
        }
    }

    /// Boots `vm` (state `starting`) from its disk file with new, empty RAM and records it
    /// running; the boot slot is released once its agent first answers. The caller undoes
    /// what is left when this throws (and releases the slot then).
    private func coldBoot(_ vm: inout VMInfo, slot: HostSlots.Slot) async throws {
        try store.makeFile(vm.memoryFile, blockSize: options.memoryBlockSize, size: UInt64(vm.memoryMiB) << 20)
        let p = try await launch(vm, memoryPath: path(file: vm.memoryFile), shared: true, incoming: false)
        try await p.resume()
        vm.pid = p.pid
        try setState(&vm, .running)
        let v = vm
        instances[vm.id]?.readiness = GuestReadiness(
            task: Task {
                defer { slot.release() }
                return await self.readyGuest(v, .boot, timeout: self.options.bootTimeout)
            }, work: .boot)
    }

    // MARK: start

    /// Boots a stopped or lost VM again from its own disk. A cold boot: what the guest had
    /// written to its disk is there, what was only in its memory is not; its memory is new
    /// (mode a). Returns once it runs, as a boot does (its agent answers a little later).
    /// - Throws: `.invalidState` for a VM that is neither stopped nor lost (a suspended one
    ///   resumes instead); `.notFound` when its disk is gone; `.overCapacity`; QEMU's errors —
    ///   then the VM is as it was, disk included.
    public func start(_ id: String) async throws -> VMInfo {
        try await withVM(id) {
            var vm = try info(id)
            let before = vm
            guard vm.state == .stopped || vm.state == .lost else {
                throw FurcateError(
                    .invalidState,
                    "VM \(id) is \(vm.state.rawValue); only a stopped or lost VM boots again (a suspended one resumes)",
                    operation: "start")
            }
            guard try store.fileExists(vm.diskFile) else {
                throw FurcateError(.notFound, "VM \(id) has no disk left to boot from", operation: "start")
            }
            let demand = VMCapacity.Demand(vcpus: vm.vcpus, memoryMiB: vm.memoryMiB)
            try admit(demand, operation: "starting a VM")
            defer { settle(demand) }
            let slot = try await bootSlots.acquire()
            try? store.deleteFile(vm.memoryFile)  // a lost VM's RAM: moot once it boots afresh
            vm.memoryMode = .shared
            vm.lostReason = nil
            vm.paused = false
            do {
                try setState(&vm, .starting)
                try await coldBoot(&vm, slot: slot)
            } catch {
                slot.release()
                if let p = instances[id]?.process { await end(id, p, graceful: false) }
                try? store.deleteFile(vm.memoryFile)
                var back = before
                back.pid = nil
                if back.state == .lost { back.lostReason = "starting it again failed (\(error)); its disk is kept" }
                try? record(back)
                throw error
            }
            logger.info("started from its disk", metadata: ["vm.id": "\(id)", "vm.pid": "\(vm.pid ?? 0)"])
            return vm
        }
    }

    // MARK: snapshot

    /// Snapshots a running VM (it keeps running): pause, device state out, RAM and disk
    /// synced, three O(1) store snapshots, resume.
    /// - Throws: `.invalidState` unless running; `.hypervisor` when QEMU fails (the VM is
    ///   resumed and nothing of the snapshot is left).
    public func snapshot(_ id: String) async throws -> SnapshotInfo {
        let s = try await withVM(id) {
            let vm = try info(id)
            guard vm.state == .running, let p = instances[id]?.process else {
                throw FurcateError(
                    .invalidState, "VM \(id) is \(vm.state.rawValue); only a running VM can be snapshotted")
            }
            if !vm.paused { await primeForForks(id, p) }
            return try await takeSnapshot(vm, p, resume: !vm.paused)
        }
        guard let c = options.snapshotCompression, c.enabled else { return s }
        return try await setSnapshotCompression(s.id, c)
    }

    /// Before the first snapshot of a booted VM whose agent is connected, the agent does once
    /// what it will do in every fork right after the restore: reseed the RNG and set the
    /// clock (harmless to the VM itself). Its code for that is then in the snapshot's page
    /// cache, so a fork runs it from memory it shares with its siblings instead of reading it
    /// from disk into pages of its own (measured: about 65 pages fewer copied on write per
    /// mode-b fork). A restored VM ran it already; an agent that does not answer within 2 s
    /// does not hold the snapshot up.
    private func primeForForks(_ id: String, _ p: QEMUProcess) async {
        guard let instance = instances[id], instance.process === p, !instance.primedForForks else { return }
        if case .restore = instance.readiness?.work { return }
        guard let agent = instance.agent, agent.isOpen else { return }
        instances[id]?.primedForForks = true
        do { try await agent.afterRestore(timeout: .seconds(2)) } catch {
            logger.debug(
                "the guest agent did not run the forks' freshening before the snapshot",
                metadata: ["vm.id": "\(id)", "error": "\(error)"])
        }
    }

    /// Pauses a running VM's vCPUs; it stays `running` (Freestyle has no paused state) with
    /// `paused` set. Pausing a paused VM is not an error.
    /// - Throws: `.invalidState` unless running.
    public func pause(_ id: String) async throws -> VMInfo {
        try await setPaused(id, true)
    }

    /// Lets a paused VM run again. Not an error when it is not paused.
    /// - Throws: `.invalidState` unless running.
    public func unpause(_ id: String) async throws -> VMInfo {
        try await setPaused(id, false)
    }

    private func setPaused(_ id: String, _ paused: Bool) async throws -> VMInfo {
        try await withVM(id) {
            var vm = try info(id)
            guard vm.state == .running, let p = instances[id]?.process else {
                throw FurcateError(
                    .invalidState,
                    "VM \(id) is \(vm.state.rawValue); only a running VM can be \(paused ? "paused" : "unpaused")")
            }
            if paused { try await p.pause() } else { try await p.resume() }
            vm.paused = paused
            try record(vm)
            return vm
        }
    }

    /// Waits until a VM's QEMU exits by itself (the guest powered off: the VM is then
    /// `stopped`; it crashed: `lost`) or `timeout` passes, and returns the VM as it is then.
    /// Not an error when it is not running.
    public func awaitExit(_ id: String, timeout: Duration) async throws -> VMInfo {
        guard let p = instances[id]?.process else { return try info(id) }
        if await p.waitForExit(timeout: timeout), let status = p.exitStatus {
            processExited(id, p, status: status)  // no-op when its watcher got there first
        }
        return try info(id)
    }

    /// Pause, device state out, RAM and disk synced, O(1) store snapshots, resume if asked.
    ///
    /// Mode a: RAM is a shared store file, left out of the stream (x-ignore-shared) and
    /// snapshotted in O(1). Mode b: RAM is private to QEMU, which cannot leave it out: the
    /// stream carries every non-zero page and the snapshot has no memory file.
    private func takeSnapshot(_ vm: VMInfo, _ p: QEMUProcess, resume: Bool, id: String = VMID.newSnapshot())
        async throws -> SnapshotInfo
    {
        var snap = SnapshotInfo(
            id: id, vmID: vm.id, memoryMiB: vm.memoryMiB, vcpus: vm.vcpus, deviceStateBytes: 0,
            createdAt: Date().timeIntervalSince1970)
        snap.ramInStream = vm.memoryMode == .privateBase
        snap.egress = vm.egress
        let tmpState = "vm-\(vm.id).state-tmp"
        var made: [String] = []
        do {
            try await p.pause()
            try checkRoom(forSnapshotOf: vm, pid: p.pid, ramInStream: snap.ramInStream)
            if try store.fileExists(tmpState) { try store.deleteFile(tmpState) }
            try await p.prepareMigration(ignoreShared: !snap.ramInStream)
            snap.deviceStateBytes = try await saveStream(p, vm, into: tmpState)
            if !snap.ramInStream {
                // RAM pages the guest dirtied live in the kernel's page cache of the mount:
                // fsync writes them back through FUSE into the store file and syncs it.
                try fsyncThroughMount(path(file: vm.memoryFile))
                try store.snapshotFile(vm.memoryFile, as: snap.memoryFile)
                made.append(snap.memoryFile)
            }
            try fsyncThroughMount(path(file: vm.diskFile))
            try store.snapshotFile(vm.diskFile, as: snap.diskFile)
            made.append(snap.diskFile)
            try store.snapshotFile(tmpState, as: snap.stateFile)
            made.append(snap.stateFile)
            try store.deleteFile(tmpState)
            try db.save(snap)
            snapshots[snap.id] = snap
            if resume { try? await p.resume() }  // a dead QEMU is seen by its exit watcher
            logger.info(
                "snapshot",
                metadata: [
                    "vm.id": "\(vm.id)", "snapshot.id": "\(snap.id)",
                    "snapshot.device_state_bytes": "\(snap.deviceStateBytes)",
                    "snapshot.ram_in_stream": "\(snap.ramInStream)",
                ])
            return snap
        } catch {
            for f in made + [tmpState] { try? store.deleteFile(f) }
            if resume { try? await p.resume() }  // a failed snapshot leaves the VM running
            throw error
        }
    }

    func waitForMigration(_ p: QEMUProcess, _ id: String) async throws {
        let outcome: MigrationOutcome
        do { outcome = try await p.migrationOutcome() } catch let e as FurcateError where e.code == .timedOut {
            throw FurcateError(.timedOut, "saving the device state of VM \(id) took over 60 s")
        }
        switch outcome {
        case .completed: return
        case .cancelled: throw FurcateError(.hypervisor, "saving the device state of VM \(id) was cancelled")
        case .failed(let why):
            throw FurcateError(
                .hypervisor, "saving the device state of VM \(id) failed: \(why ?? "QEMU gave no reason")")
        }
    }

    // MARK: fork and restore

    /// Forks a running VM `count` ways: one snapshot, then `count` O(1) clones restored in
    /// parallel. The parent keeps running; every fork continues from the snapshot point with
    /// its own disk and memory.
    /// - Throws: `.invalidArgument` for a count outside 1…1000, `.invalidState` unless
    ///   running; when any fork fails, the forks already made are removed and the error thrown.
    /// - Parameter newIdentity: give each fork its own hostname (its VM id) and machine-id.
    public func fork(_ id: String, count: Int, memoryMode: MemoryMode? = nil, newIdentity: Bool = false) async throws
        -> ForkResult
    {
        guard (1...1000).contains(count) else {
            throw FurcateError(.invalidArgument, "fork count must be 1 to 1000, not \(count)")
        }
        // All or none: the forks are admitted before the snapshot, so a fork the host has no
        // room for makes nothing.
        let parent = try info(id)
        guard parent.state == .running else {
            throw FurcateError(.invalidState, "VM \(id) is \(parent.state.rawValue); only a running VM can be forked")
        }
        let demand = VMCapacity.Demand(vcpus: parent.vcpus, memoryMiB: parent.memoryMiB)
        try admit(demand, count: count, operation: "forking VM \(id) \(count) ways")
        let t0 = ContinuousClock.now
        let snap: SnapshotInfo
        do { snap = try await snapshot(id) } catch {
            settle(demand, count: count)
            throw error
        }
        let snapDuration = ContinuousClock.now - t0
        let mode = memoryMode ?? options.forkMemoryMode
        // Pooled QEMUs are replaced once every fork runs: a QEMU starting up meanwhile would
        // take the CPU from the restores (on a small host it doubled the restore step).
        defer { refillPoolSoon(for: snap, mode: mode) }
        let results = await withTaskGroup(of: Result<(VMInfo, RestoreTiming), any Error>.self) { group in
            for _ in 0..<count {
                group.addTask {
                    do {
                        return .success(
                            try await self.restoreNew(snap, mode: mode, newIdentity: newIdentity, admitted: true))
                    } catch {
                        return .failure(error)
                    }
                }
            }
            var out: [Result<(VMInfo, RestoreTiming), any Error>] = []
            for await r in group { out.append(r) }
            return out
        }
        var made: [(VMInfo, RestoreTiming)] = []
        var firstError: (any Error)?
        for r in results {
            switch r {
            case .success(let m): made.append(m)
            case .failure(let e): firstError = firstError ?? e
            }
        }
        if let firstError {
            for (vm, _) in made { try? await delete(vm.id) }
            throw firstError
        }
        return ForkResult(
            snapshot: snap, snapshotDuration: snapDuration, vms: made.map { $0.0 }, timings: made.map { $0.1 })
    }

    /// A new VM restored from `snap`.
    /// - Parameter admitted: `admit` counted it already (a fork admits all its VMs at once).
    private func restoreNew(
        _ snap: SnapshotInfo, mode: MemoryMode, newIdentity: Bool = false, admitted: Bool = false,
        egress: EgressPolicy? = nil
    ) async throws -> (VMInfo, RestoreTiming) {
        let demand = VMCapacity.Demand(vcpus: snap.vcpus, memoryMiB: snap.memoryMiB)
        if !admitted { try admit(demand, operation: "restoring snapshot \(snap.id)") }
        defer { settle(demand) }
        let pooled = poolShape(for: snap, mode: mode).flatMap { takeFromPool($0) }
        var vm = VMInfo(
            id: pooled?.id ?? VMID.newVM(), state: .starting, memoryMiB: snap.memoryMiB, vcpus: snap.vcpus,
            memoryMode: mode,
            parentSnapshot: snap.id, suspendedSnapshot: nil, pid: nil, resumeOnStart: false,
            createdAt: Date().timeIntervalSince1970)
        vm.egress = egress ?? snap.egress
        do {
            let timing = try await restore(&vm, from: snap, pooled: pooled, newIdentity: newIdentity)
            return (vm, timing)
        } catch {
            await discardFailed(vm)
            throw error
        }
    }

    /// Restores `snap` into `vm` (its files must not exist): clones, spawn, device state in,
    /// resume. On return the VM runs and is recorded. On error the caller cleans up.
    private func restore(
        _ vm: inout VMInfo, from snap: SnapshotInfo, pooled: PoolEntry? = nil, newIdentity: Bool = false
    ) async throws -> RestoreTiming {
        var t = RestoreTiming()
        var mark = ContinuousClock.now
        func lap() -> Duration {
            let now = ContinuousClock.now
            defer { mark = now }
            return now - mark
        }
        if let pooled {
            // A waiting QEMU has these two files open, empty: give them the snapshot's contents.
            try store.replaceFileContents(of: vm.diskFile, with: snap.diskFile)
            try store.replaceFileContents(of: vm.memoryFile, with: snap.memoryFile)
            // The pooled QEMU's network was made with the default policy: the VM's, before it runs.
            if egressPolicy(vm) != options.egress { try applyEgress(vm) }
            t.storeClone = lap()
            return try await finishRestore(&vm, snap, pooled.process, t, lap, newIdentity: newIdentity)
        }
        try store.cloneFile(snap.diskFile, to: vm.diskFile)
        let memoryPath: String
        if snap.ramInStream {
            // The stream fills a fresh (sparse) memory file; no base to map privately.
            vm.memoryMode = .shared
            try store.makeFile(vm.memoryFile, blockSize: options.memoryBlockSize, size: UInt64(vm.memoryMiB) << 20)
            memoryPath = path(file: vm.memoryFile)
        } else {
            memoryPath = try await memoryForRestore(vm, snap)
        }
        t.storeClone = lap()
        let p = try await launch(vm, memoryPath: memoryPath, shared: vm.memoryMode == .shared, incoming: true)
        t.spawn = lap()
        return try await finishRestore(&vm, snap, p, t, lap, newIdentity: newIdentity)
    }

    /// Loads the device state into a waiting QEMU and resumes it.
    private func finishRestore(
        _ vm: inout VMInfo, _ snap: SnapshotInfo, _ p: QEMUProcess, _ timing: RestoreTiming, _ lap: () -> Duration,
        newIdentity: Bool
    ) async throws -> RestoreTiming {
        var t = timing
        try await p.prepareMigration(ignoreShared: !snap.ramInStream)
        try await loadStream(p, vm, from: snap.stateFile)
        t.migrateIncoming = lap()
        // QEMU resumed the guest as the load completed (RESUME comes before the MIGRATION
        // `completed` event), unless the stream says the VM was paused when it was saved.
        if !p.resumedAfterLoad() { try await p.resume() }
        t.resume = lap()
        vm.pid = p.pid
        try setState(&vm, .running)
        // The guest runs from `cont` on, whether or not this call has returned, so waiting here
        // would protect nothing more: the agent freshens it in the background, and every
        // operation that reaches the guest through this service waits for that first.
        let v = vm
        instances[vm.id]?.readiness = GuestReadiness(
            task: Task {
                await self.readyGuest(v, .restore(newIdentity: newIdentity), timeout: self.options.agentTimeout)
            },
            work: .restore(newIdentity: newIdentity))
        logger.info(
            "restored",
            metadata: ["vm.id": "\(vm.id)", "snapshot.id": "\(snap.id)", "vm.memory_mode": "\(vm.memoryMode.rawValue)"])
        return t
    }

    /// After a boot: connects to the guest agent once it answers. Right after a restore: the
    /// guest agent mixes fresh host entropy into the kernel and forces a CRNG reseed (every
    /// fork of a snapshot starts with the same RNG state), sets the wall clock (it still shows
    /// the snapshot's time), and with `newIdentity` sets the hostname to the VM id and writes a
    /// new /etc/machine-id. Without an agent the VM runs on, with a warning.
    private func readyGuest(_ vm: VMInfo, _ work: GuestWork, timeout: Duration) async -> Bool {
        let p = instances[vm.id]?.process
        do {
            let agent = try await connectAgent(vm.id, process: p, timeout: timeout)
            do {
                if case .restore(let newIdentity) = work {
                    try await agent.afterRestore(hostname: newIdentity ? vm.id : nil)
                    if newIdentity {
                        let machineID =
                            (0..<16).map { _ in String(format: "%02x", UInt8.random(in: 0...255)) }.joined() + "\n"
                        try await agent.writeFile("/etc/machine-id", Data(machineID.utf8), mode: 0o444)
                    }
                }
            } catch {
                agent.close()
                throw error
            }
            // Kept as the VM's connection: the next caller needs no new one, and an agent whose
            // host stays connected sleeps in its read instead of waiting for a connection.
            if instances[vm.id]?.process !== p || instances[vm.id]?.agent?.isOpen == true {
                agent.close()
            } else {
                instances[vm.id]?.agent = agent
            }
            return true
        } catch {
            if p == nil || instances[vm.id]?.process !== p {
                logger.debug(
                    "VM ended before its guest agent answered", metadata: ["vm.id": "\(vm.id)", "error": "\(error)"])
                return false
            }
            switch work {
            case .boot:
                logger.warning(
                    "the booted VM's guest agent did not answer", metadata: ["vm.id": "\(vm.id)", "error": "\(error)"])
            case .restore:
                logger.warning(
                    "guest agent did not freshen the restored VM (RNG state shared with its siblings, clock as at the snapshot)",
                    metadata: ["vm.id": "\(vm.id)", "error": "\(error)"])
            }
            return false
        }
    }

    /// The memory file a restore of `snap` maps: a clone of its memory (mode a), or its
    /// shared private base (mode b, made once per snapshot).
    private func memoryForRestore(_ vm: VMInfo, _ snap: SnapshotInfo) async throws -> String {
        switch vm.memoryMode {
        case .shared:
            try store.cloneFile(snap.memoryFile, to: vm.memoryFile)
            return path(file: vm.memoryFile)
        case .privateBase:
            try await baseLock.withLock {
                if try !store.fileExists(snap.privateBaseFile) {
                    try store.cloneFile(snap.memoryFile, to: snap.privateBaseFile)
                }
            }
            return path(file: snap.privateBaseFile)
        }
    }

    /// Waits until an incoming migration has loaded (the machine is then paused: it starts
    /// with -S). A stream QEMU cannot load makes it exit; that is reported with its log.
    func waitForIncoming(_ p: QEMUProcess, _ id: String) async throws {
        let outcome: MigrationOutcome
        do { outcome = try await p.migrationOutcome() } catch let e as FurcateError where e.code == .timedOut {
            throw FurcateError(.timedOut, "restoring VM \(id) took over 60 s")
        } catch {
            outcome = .failed(nil)
        }
        guard outcome == .completed else {
            _ = await p.waitForExit(timeout: .seconds(2))  // its log says why; QEMU exits after a failed load
            throw FurcateError(
                .hypervisor,
                "restoring VM \(id) failed: the device state was refused (\(QEMUProcess.logTail(p.logPath, lines: 3)))",
                path: p.logPath)
        }
    }

    // MARK: suspend / resume

    /// Snapshots a running VM and ends its process; `resume` brings it back.
    /// - Throws: `.invalidState` unless running; on failure the VM keeps running.
    public func suspend(_ id: String) async throws -> VMInfo {
        try await withVM(id) {
            var vm = try info(id)
            try vm.state.checkTransition(to: .suspending, vm: id, operation: "suspend")
            guard let p = instances[id]?.process else { throw FurcateError(.invalidState, "VM \(id) has no process") }
            // The snapshot's id is recorded first: a server that dies meanwhile lets the next one
            // tell a suspend that saved the VM (its snapshot is recorded) from one that did not.
            let sid = VMID.newSnapshot()
            vm.suspendedSnapshot = sid
            try setState(&vm, .suspending)
            let snap: SnapshotInfo
            do { snap = try await takeSnapshot(vm, p, resume: false, id: sid) } catch {
                try? await p.resume()
                vm.suspendedSnapshot = nil
                try setState(&vm, .running)
                throw error
            }
            await end(id, p, graceful: false)
            try? store.deleteFile(vm.memoryFile)
            try? store.deleteFile(vm.diskFile)
            vm.suspendedSnapshot = snap.id
            vm.pid = nil
            try setState(&vm, .suspended)
            return vm
        }
    }

    /// Resumes a suspended VM from its snapshot; the same id, the state it was suspended in.
    /// - Throws: `.invalidState` unless suspended; on failure it stays suspended.
    public func resume(_ id: String) async throws -> (VMInfo, RestoreTiming) {
        try await withVM(id) {
            var vm = try info(id)
            try vm.state.checkTransition(to: .starting, vm: id, operation: "resume")
            guard vm.state == .suspended, let sid = vm.suspendedSnapshot, let snap = snapshots[sid] else {
                throw FurcateError(.invalidState, "VM \(id) is \(vm.state.rawValue), not suspended")
            }
            try admit(.init(vcpus: vm.vcpus, memoryMiB: vm.memoryMiB), operation: "resuming VM \(id)", reserve: false)
            try setState(&vm, .starting)
            do {
                vm.memoryMode = .shared
                let t = try await restore(&vm, from: snap)
                vm.suspendedSnapshot = nil
                vm.paused = false
                vm.resumeOnStart = false
                try record(vm)
                try? deleteSnapshotFiles(snap)
                return (vm, t)
            } catch {
                if let p = instances[id]?.process { await end(id, p, graceful: false) }
                try? store.deleteFile(vm.memoryFile)
                try? store.deleteFile(vm.diskFile)
                vm.pid = nil
                try? setState(&vm, .suspended)
                throw error
            }
        }
    }

    // MARK: stop / kill / delete

    /// Stops a VM: asks the guest to power off, ends QEMU after `gracefulStopTimeout`.
    /// A stopped VM keeps its disk; its RAM is dropped. Stopping a stopped VM is not an error.
    public func stop(_ id: String) async throws -> VMInfo {
        try await halt(id, graceful: true)
    }

    /// Kills a VM's QEMU at once (SIGKILL). Not an error when it is not running.
    public func kill(_ id: String) async throws -> VMInfo {
        try await halt(id, graceful: false)
    }

    private func halt(_ id: String, graceful: Bool) async throws -> VMInfo {
        try await withVM(id) {
            var vm = try info(id)
            if vm.state == .stopped { return vm }
            if let p = instances[id]?.process { await end(id, p, graceful: graceful) }
            if let sid = vm.suspendedSnapshot, let snap = snapshots[sid] {
                // A suspended VM's disk lives in its snapshot: keep it as the stopped disk.
                if try !store.fileExists(vm.diskFile) { try store.cloneFile(snap.diskFile, to: vm.diskFile) }
                try? deleteSnapshotFiles(snap)
                vm.suspendedSnapshot = nil
            }
            try? store.deleteFile(vm.memoryFile)
            vm.pid = nil
            vm.paused = false
            vm.resumeOnStart = false
            vm.lostReason = nil
            try setState(&vm, .stopped)
            return vm
        }
    }

    /// Deletes a VM: kills it if needed and removes its files, run directory and record.
    /// Snapshots taken of it remain. - Throws: `.notFound`.
    public func delete(_ id: String) async throws {
        try await withVM(id) {
            let vm = try info(id)
            if let p = instances[id]?.process { await end(id, p, graceful: false) }
            if let sid = vm.suspendedSnapshot, let snap = snapshots[sid] { try? deleteSnapshotFiles(snap) }
            for f in [vm.memoryFile, vm.diskFile] where (try? store.fileExists(f)) == true { try store.deleteFile(f) }
            try? FileManager.default.removeItem(atPath: runDirectory(id))
            releaseNetwork(id)
            try db.deleteVM(id)
            vms[id] = nil
        }
        locks[id] = nil
    }

    /// Deletes a snapshot's store files and record. VMs forked from it are independent.
    public func deleteSnapshot(_ id: String) async throws {
        let s = try snapshotInfo(id)
        await stopCompression(id)
        try deleteSnapshotFiles(s)
    }

    private func deleteSnapshotFiles(_ s: SnapshotInfo) throws {
        for f in [s.memoryFile, s.diskFile, s.stateFile, s.privateBaseFile] where (try? store.fileExists(f)) == true {
            try store.deleteFile(f)
        }
        try db.deleteSnapshot(s.id)
        snapshots[s.id] = nil
    }

    // MARK: server lifecycle

    /// At start: a VM recorded running whose QEMU a previous server left running (it crashed,
    /// or stopped with its VMs kept running) is taken over, still running; every other QEMU
    /// left for this data directory is ended (a pooled one, which no record names, or one
    /// whose VM was mid-operation); VMs whose QEMU is gone or was ended are lost, and VMs
    /// suspended at a graceful shutdown are resumed. Returns the ids resumed or taken over.
    @discardableResult
    public func recover() async -> [String] {
        recoverNetworks()
        let leftovers = leftoverQEMUs()
        var resumed: [String] = []
        // A suspend the last server did not finish, its QEMU still running: the VM runs on (its
        // half-made snapshot goes), taken over below like any running VM.
        for var vm in vms.values where vm.state == .suspending && instances[vm.id] == nil {
            guard let pid = vm.pid, leftovers.contains(where: { $0.pid == pid && $0.id == vm.id }) else { continue }
            if let sid = vm.suspendedSnapshot, let snap = snapshots[sid] { try? deleteSnapshotFiles(snap) }
            vm.suspendedSnapshot = nil
            try? setState(&vm, .running)
            logger.notice("a suspend was cut off by the server's end; the VM runs on", metadata: ["vm.id": "\(vm.id)"])
        }
        for vm in vms.values where vm.state == .running && instances[vm.id] == nil {
            guard let pid = vm.pid, leftovers.contains(where: { $0.pid == pid && $0.id == vm.id }) else { continue }
            do {
                try await adopt(vm, pid: pid)
                resumed.append(vm.id)
                logger.notice("took over a running VM", metadata: ["vm.id": "\(vm.id)", "vm.pid": "\(pid)"])
            } catch {
                logger.error(
                    "cannot take over a running VM's QEMU; ending it",
                    metadata: ["vm.id": "\(vm.id)", "vm.pid": "\(pid)", "error": "\(error)"])
            }
        }
        for (pid, id) in leftovers where instances[id] == nil {
            Glibc.kill(pid, SIGKILL)
            logger.warning(
                "ended a QEMU a previous server left running", metadata: ["vm.id": "\(id)", "vm.pid": "\(pid)"])
        }
        removeOrphanFiles()
        // A compression the last server did not finish starts again (the blocks it had
        // re-encoded keep their new encoding; the rest are read as they were).
        for s in snapshots.values.sorted(by: { $0.createdAt < $1.createdAt })
        where s.compressionState == .compressing {
            guard let c = s.compression else { continue }
            do {
                try await setSnapshotCompression(s.id, c)
                logger.notice("started an unfinished snapshot compression again", metadata: ["snapshot.id": "\(s.id)"])
            } catch {
                logger.error(
                    "cannot start a snapshot compression again",
                    metadata: ["snapshot.id": "\(s.id)", "error": "\(error)"])
            }
        }
        for var vm in vms.values.sorted(by: { $0.createdAt < $1.createdAt }) where instances[vm.id] == nil {
            switch vm.state {
            case .suspending where vm.suspendedSnapshot.flatMap({ snapshots[$0] }) != nil,
                .starting where vm.suspendedSnapshot.flatMap({ snapshots[$0] }) != nil:
                // A suspend that had saved the VM (its snapshot is recorded), or a resume cut off
                // before it finished: the VM is suspended in that snapshot, which is whole (a
                // resume deletes it only after recording the VM running).
                let cut = vm.state == .suspending ? "suspend" : "resume"
                for f in [vm.memoryFile, vm.diskFile] { try? store.deleteFile(f) }
                vm.pid = nil
                try? setState(&vm, .suspended)
                logger.notice(
                    "a \(cut) was cut off by the server's end; the VM is suspended", metadata: ["vm.id": "\(vm.id)"])
            case .running, .starting, .suspending, .building:
                vm.pid = nil
                vm.lostReason =
                    vm.state == .running
                    ? "its QEMU was gone when the server started again, so its memory is gone; its disk keeps what"
                        + " the guest had written, and start boots it again"
                    : "the server stopped while it was \(vm.state.rawValue), so its memory is gone; its disk is kept"
                        + " as the store last had it, and start boots it again"
                try? setState(&vm, .lost)
                logger.warning("VM lost across a restart", metadata: ["vm.id": "\(vm.id)"])
            case .suspended where vm.resumeOnStart:
                do {
                    _ = try await resume(vm.id)
                    resumed.append(vm.id)
                } catch {
                    logger.error(
                        "cannot resume VM after restart", metadata: ["vm.id": "\(vm.id)", "error": "\(error)"])
                }
            default: break
            }
        }
        return resumed
    }

    /// Lets go of every running VM without ending it, for the next server to take over
    /// (`furcate serve --keep-vms-running`): pooled QEMUs are ended (nobody would adopt them),
    /// then each VM's agent and QMP connections close and its exit stops being watched here.
    /// Running VMs stay recorded running with their pids.
    public func detachAll() async {
        poolGate = .closed
        await drainWarmPool()
        for id in Array(instances.keys) {
            guard let instance = tearDown(id) else { continue }
            instance.process.qmp.close()
            logger.info("left running for the next server", metadata: ["vm.id": "\(id)"])
        }
    }

    /// Lets go of every QEMU, pooled ones included, ending none and saying nothing: what this
    /// process's death leaves behind (its connections closed, nothing else). For tests of a
    /// server that died; a real one's kernel closes the same connections.
    public func abandonAll() {
        poolGate = .closed
        pool.removeAll()
        for id in Array(instances.keys) { tearDown(id)?.process.qmp.close() }
    }

    /// The storage process serving every VM's disk and RAM ended (`reason` says how): each
    /// QEMU left is ended (its files are gone from under it) and its VM is lost, keeping its
    /// disk as the store last synced it; start boots it again once a storage process runs.
    /// Pooled QEMUs are ended too.
    public func storageEnded(_ reason: String) async {
        await drainWarmPool()
        for (id, instance) in instances {
            tearDown(id)
            await instance.process.kill()
            cleanRunDirectory(id)
            guard var vm = vms[id], vm.state == .running else { continue }
            vm.pid = nil
            vm.lostReason =
                reason + "; its memory is gone, its disk keeps what the guest had synced, and start boots it again"
            try? setState(&vm, .lost)
            logger.error("VM lost with the storage process", metadata: ["vm.id": "\(id)"])
        }
    }

    /// Graceful server shutdown: every running VM is suspended (so its RAM, disk and device
    /// state are in the store) and marked to be resumed by the next `recover()`. A few at a
    /// time: one by one, 60 VMs on a 2-core host took 20 minutes.
    public func shutdown() async {
        poolGate = .closed
        await drainWarmPool()
        let running = vms.values.filter { $0.state == .running }.map(\.id)
        let width = max(2, ProcessInfo.processInfo.activeProcessorCount)
        await withTaskGroup(of: Void.self) { group in
            for (i, id) in running.enumerated() {
                if i >= width { await group.next() }
                group.addTask { await self.suspendForShutdown(id) }
            }
        }
        removeIdleNetworks()
    }

    private func suspendForShutdown(_ id: String) async {
        do {
            var v = try await suspend(id)
            v.resumeOnStart = true
            try record(v)
        } catch {
            logger.error(
                "cannot suspend VM at shutdown; killing it", metadata: ["vm.id": "\(id)", "error": "\(error)"])
            _ = try? await kill(id)
        }
    }

    // MARK: helpers

    func withVM<T: Sendable>(_ id: String, _ body: () async throws -> T) async throws -> T {
        guard vms[id] != nil else { throw FurcateError(.notFound, "no VM \(id)") }
        let lock = locks[id] ?? AsyncLock()
        locks[id] = lock
        return try await lock.withLock { try await body() }
    }

    /// A stopped VM whose disk is an O(1) clone of `snapshot`'s: what restoring it and stopping
    /// at once would leave, without running it (bulk setup: `furcate bench api` lists 1,000 VMs).
    /// - Throws: `.notFound` for an unknown snapshot.
    public func createStopped(fromSnapshot snapshot: String) throws -> VMInfo {
        let s = try snapshotInfo(snapshot)
        var vm = VMInfo(
            id: VMID.newVM(), state: .stopped, memoryMiB: s.memoryMiB, vcpus: s.vcpus, memoryMode: .shared,
            parentSnapshot: s.id,
            suspendedSnapshot: nil, pid: nil, resumeOnStart: false, createdAt: Date().timeIntervalSince1970)
        vm.egress = s.egress
        try store.cloneFile(s.diskFile, to: vm.diskFile)
        do { try record(vm) } catch {
            try? store.deleteFile(vm.diskFile)
            throw error
        }
        return vm
    }

    func record(_ vm: VMInfo) throws {
        var vm = vm
        vm.networkIndex = networkIndexes[vm.id]
        try db.save(vm)
        vms[vm.id] = vm
    }

    /// Every state change goes through here: checked against `VMState.transitions`, then
    /// recorded (database and memory).
    private func setState(_ vm: inout VMInfo, _ to: VMState) throws {
        try vm.state.checkTransition(to: to, vm: vm.id, operation: "become \(to.rawValue)")
        vm.state = to
        try record(vm)
    }

    nonisolated func path(file name: String) -> String { options.mountpoint + "/files/" + name }
    nonisolated func path(snapshot name: String) -> String { options.mountpoint + "/snapshots/" + name }

    /// The machine `vm` runs as: its files, sockets and shape.
    nonisolated func machineConfig(_ vm: VMInfo, memoryPath: String, shared: Bool) -> MachineConfig {
        let run = runDirectory(vm.id)
        var config = MachineConfig(
            memoryPath: memoryPath, kernel: options.guestDirectory + "/vmlinuz",
            initrd: options.guestDirectory + "/initrd.img",
            rootDisk: path(file: vm.diskFile), channelSocket: run + "/channel.sock", qmpSocket: run + "/qmp.sock",
            consoleLog: run + "/console.log")
        config.memoryMiB = vm.memoryMiB
        config.vcpus = vm.vcpus
        config.memoryShared = shared
        config.accelerator = options.accelerator
        if options.debugShell { config.shellSocket = run + "/shell.sock" }
        config.network = options.network
        return config
    }

    /// Spawns QEMU for `vm` and watches for its exit.
    func launch(_ vm: VMInfo, memoryPath: String, shared: Bool, incoming: Bool) async throws -> QEMUProcess {
        let run = runDirectory(vm.id)
        try? FileManager.default.createDirectory(atPath: run, withIntermediateDirectories: true)
        var config = machineConfig(vm, memoryPath: memoryPath, shared: shared)
        if config.network, options.networks != nil {
            config.netTap = NetTap(
                namespace: try ensureNetwork(vm.id, policy: egressPolicy(vm)).namespace, device: GuestAddressing.tap)
        }
        for f in [config.kernel, config.initrd] where access(f, R_OK) != 0 {
            throw FurcateError(.notFound, "guest artifact missing (run scripts/guest-artifacts.sh)", path: f)
        }
        let p = try await QEMUProcess.launch(
            config, incoming: incoming, binary: options.qemuBinary, logPath: run + "/qemu.log",
            readyTimeout: options.startTimeout)
        watch(vm.id, p)
        return p
    }

    /// `p` becomes `id`'s runtime; its exit is seen by `processExited`.
    private func watch(_ id: String, _ p: QEMUProcess) {
        instances[id] = VMInstance(process: p)
        Task { [weak self] in
            let status = await p.waitForExit()
            await self?.processExited(id, p, status: status)
        }
    }

    /// Takes over the QEMU (pid `pid`) a previous server left running for `vm`: QMP again,
    /// the guest running (a crash mid-snapshot or mid-suspend left it paused), the agent
    /// reconnected on first use. The guest's RAM and disk never left the storage process.
    private func adopt(_ vm: VMInfo, pid: Int32) async throws {
        // The sockets and shape are what a running QEMU is driven by; its memory file stays
        // whatever it mapped at its start.
        let config = machineConfig(vm, memoryPath: path(file: vm.memoryFile), shared: vm.memoryMode == .shared)
        let p = try await QEMUProcess.adopt(pid: pid, config: config, logPath: runDirectory(vm.id) + "/qemu.log")
        do {
            if try await p.runStatus() != "running" { try await p.resume() }
        } catch {
            await p.kill()
            throw error
        }
        watch(vm.id, p)
    }

    /// A QEMU exited. When nobody ended it on purpose, its VM is stopped (the guest powered
    /// off: QEMU exits 0) or lost (anything else).
    private func processExited(_ id: String, _ p: QEMUProcess, status: Int32) {
        guard instances[id]?.process === p else { return }  // ended on purpose, already accounted for
        tearDown(id)
        guard var vm = vms[id], vm.state == .running else { return }
        let clean = status & 0x7f == 0 && (status >> 8) & 0xff == 0
        vm.pid = nil
        if !clean { vm.lostReason = Self.lostReason(exitStatus: status) }
        try? setState(&vm, clean ? .stopped : .lost)
        cleanRunDirectory(id)
        if clean { try? store.deleteFile(vm.memoryFile) }
        logger.warning(
            "QEMU exited by itself",
            metadata: ["vm.id": "\(id)", "vm.state": "\(vm.state.rawValue)", "qemu.status": "\(status)"])
    }

    /// Why a VM whose QEMU ended with wait status `status` by itself is lost, and what it kept.
    static func lostReason(exitStatus status: Int32) -> String {
        let signal = status & 0x7f
        let how =
            status == QEMUProcess.unknownExit
            ? "QEMU ended (it was taken over from a previous server, so how is not known)"
            : signal == 0
                ? "QEMU exited with status \((status >> 8) & 0xff)"
                : signal == SIGKILL
                    ? "QEMU was killed (SIGKILL: the kernel's OOM killer, or another process)"
                    : "QEMU ended on signal \(signal)"
        return how + "; its memory is gone, its disk keeps what the guest had written, and start boots it again"
    }

    /// The one way a VM's runtime ends: its instance leaves the table and its agent connection
    /// closes. Its readiness work is moot with the process gone (a restore makes a new
    /// instance); one still under way fails at once on the closed channel (a boot's slot is
    /// freed then). The caller ends the process itself if it still runs.
    @discardableResult
    func tearDown(_ id: String) -> VMInstance? {
        guard let instance = instances.removeValue(forKey: id) else { return nil }
        instance.agent?.close()
        return instance
    }

    /// Ends a VM's QEMU (asking the guest first when `graceful`) and removes its sockets.
    private func end(_ id: String, _ p: QEMUProcess, graceful: Bool) async {
        tearDown(id)
        if graceful {
            // The agent syncs and asks the image's init to power off (and powers off itself
            // when init does not); without an agent, the ACPI power button.
            let grace = max(1, Int(options.gracefulStopTimeout.components.seconds))
            if let agent = try? await connectAgent(id, process: p, timeout: .seconds(1)) {
                try? await agent.shutdown(graceSeconds: grace)
                agent.close()
            } else {
                try? await p.pressPowerButton()
            }
            if !(await p.waitForExit(timeout: options.gracefulStopTimeout)) { await p.terminate(grace: .seconds(5)) }
        } else {
            await p.kill()
        }
        cleanRunDirectory(id)
    }

    /// The guest agent of VM `id` over its channel socket, once it answers a ping.
    /// `process`: the VM's QEMU; once it has exited, connecting stops at once.
    /// `timeout` is in time the QEMU could run (see `Deadline`): on a loaded host a guest waiting
    /// for a CPU is given its chance to answer.
    private nonisolated func connectAgent(_ id: String, process: QEMUProcess?, timeout: Duration) async throws
        -> AgentClient
    {
        let deadline: Deadline = process.map { .runTime(timeout, of: $0.pid) } ?? .after(timeout)
        return try await AgentClient.connect(socket: runDirectory(id) + "/channel.sock", deadline: deadline) {
            process?.exitStatus == nil
        }
    }

    /// Removes a VM's sockets (its logs stay until the VM is deleted).
    private nonisolated func cleanRunDirectory(_ id: String) {
        for s in ["qmp.sock", "channel.sock", "shell.sock", "migrate.sock"] { unlink(runDirectory(id) + "/" + s) }
    }

    /// Removes everything a failed create or restore made.
    func discardFailed(_ vm: VMInfo) async {
        if let p = instances[vm.id]?.process { await end(vm.id, p, graceful: false) }
        for f in [vm.memoryFile, vm.diskFile] { try? store.deleteFile(f) }
        try? FileManager.default.removeItem(atPath: runDirectory(vm.id))
        releaseNetwork(vm.id)
        try? db.deleteVM(vm.id)
        vms[vm.id] = nil
    }

    /// Refuses a snapshot of the (paused) `vm` that could take the store's filesystem below
    /// `snapshotReserveBytes`: what it may write is the guest RAM pages the kernel holds dirty
    /// for the memory file (shared memory), or the whole guest RAM (a stream that carries
    /// RAM), counted uncompressed.
    /// - Throws: `.diskFull` naming both figures.
    private nonisolated func checkRoom(forSnapshotOf vm: VMInfo, pid: Int32, ramInStream: Bool) throws {
        var st = statvfs()
        guard statvfs(options.mountpoint, &st) == 0 else { return }  // the write itself will say
        let free = UInt64(st.f_bavail) * UInt64(st.f_frsize)
        let needed =
            ramInStream
            ? UInt64(vm.memoryMiB) << 20 : Self.dirtyBytes(pid: pid, mapping: "/files/" + vm.memoryFile)
        guard free < needed + options.snapshotReserveBytes else { return }
        throw FurcateError(
            .diskFull,
            "disk full: the store's filesystem has \(ByteSize.format(free)) free; a snapshot of VM \(vm.id) may "
                + "write \(ByteSize.format(needed)) of guest memory and must leave \(ByteSize.format(options.snapshotReserveBytes)) "
                + "for the running VMs; free space (delete snapshots or VMs) and try again",
            path: options.mountpoint)
    }

    /// Dirty bytes of the mappings of process `pid` whose path contains `mapping` (from
    /// /proc/PID/smaps); zero when it cannot be read.
    static func dirtyBytes(pid: Int32, mapping: String) -> UInt64 {
        guard let text = readWholeFile("/proc/\(pid)/smaps") else { return 0 }
        var dirty: UInt64 = 0, inside = false
        for line in text.split(separator: "\n") {
            let fields = line.split(separator: " ", omittingEmptySubsequences: true)
            guard let key = fields.first else { continue }
            if !key.hasSuffix(":") {  // a mapping's header line
                inside = line.contains(mapping)
                continue
            }
            guard inside, fields.count > 1, let kib = UInt64(fields[1]) else { continue }
            if key == "Shared_Dirty:" || key == "Private_Dirty:" { dirty += kib << 10 }
        }
        return dirty
    }

    private nonisolated func fsyncThroughMount(_ path: String) throws {
        let fd = try syscall("open", path: path) { open(path, O_RDWR | O_CLOEXEC) }
        defer { close(fd) }
        try syscall("fsync", path: path) { fsync(fd) }
    }

    /// Cold boots at once by default: one per host core under TCG (a booting guest keeps its
    /// vCPU busy), two per core under KVM (boots wait on I/O more than on the CPU).
    public static func defaultConcurrentBoots(
        _ accelerator: Accelerator, cores: Int = ProcessInfo.processInfo.activeProcessorCount
    ) -> Int {
        max(1, cores) * (accelerator == .kvm ? 2 : 1)
    }

    /// True when `pid` runs a QEMU (so a stale pid from the database is not someone else's).
    /// The QEMUs running for this data directory, with the VM (or pool entry) each is for:
    /// found by their command lines, which name their run directories (`-qmp unix:RUN/ID/…`).
    /// A recorded pid alone could by now be an unrelated process; a pooled QEMU's is recorded
    /// nowhere.
    public nonisolated func leftoverQEMUs() -> [(pid: Int32, id: String)] {
        let runRoot = runDirectory("")
        var found: [(pid: Int32, id: String)] = []
        for entry in (try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? [] {
            guard let pid = Int32(entry), (readWholeFile("/proc/\(pid)/comm") ?? "").hasPrefix("qemu"),
                let cmdline = readWholeFile("/proc/\(pid)/cmdline"), let at = cmdline.range(of: runRoot)
            else { continue }
            let id = cmdline[at.upperBound...].prefix { $0 != "/" && $0 != "\0" && $0 != "," }
            if id.count == 20 { found.append((pid, String(id))) }
        }
        return found
    }
}
