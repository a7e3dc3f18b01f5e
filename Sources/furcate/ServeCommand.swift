import APIServer
import Accounts
import ArgumentParser
import BlockStore
import Foundation
import FurcateCore
import FurcateEngine
import Ingress
import Logging
import ServiceLifecycle
import StoreServer
import VMNetwork
import VMService

/// `furcate serve`: the engine over a data directory and the HTTP API, until SIGTERM/SIGINT.
struct ServeCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Run the engine (store, mount, VMs, images, builds) and the HTTP API until SIGTERM/SIGINT.")
    @OptionGroup var data: DataOption
    @Option(help: "Address to listen on.") var host = "127.0.0.1"
    @Option(help: "Port to listen on.") var port = 8080
    @Option(
        name: .customLong("idle-timeout"),
        help: "Seconds without API activity before a Freestyle VM that names no idle timeout is suspended (0: never).")
    var idleTimeout = 300
    @Option(
        name: .customLong("storage-quota-gb"),
        help:
            "GiB each account may keep in VMs and snapshots before its sticky ones are evicted, least recently used first (default: no quota)."
    )
    var storageQuotaGb: Int?
    @Option(
        help:
            "QEMUs kept waiting per machine shape so a restore or fork skips process start (0: none); filled after a shape's first restore."
    )
    var warmPool = 2
    @Option(
        name: .customLong("max-vcpus"),
        help:
            "Guest vCPUs running at once; a create, fork or resume past it is refused with 429 (default: 16 per host core under KVM, 8 under TCG)."
    )
    var maxVCPUs: Int?
    @Option(
        name: .customLong("max-guest-memory-gib"),
        help:
            "GiB of guest memory running at once; a create, fork or resume past it is refused with 429 (default: 1.5 × host memory)."
    )
    var maxGuestMemoryGib: Int?
    @Option(
        name: .customLong("concurrent-boots"),
        help:
            "Cold boots under way at once on this host, shared with every other furcate process; later ones wait their turn (default: one per core under TCG, two under KVM)."
    )
    var concurrentBoots: Int?
    @Option(
        name: .customLong("snapshot-compression"),
        help:
            "Compress the memory of every new snapshot in the background: none, zstd, zstd:LEVEL (1-19) or lz4 (default: none)."
    )
    var snapshotCompression = "none"
    @Option(
        name: .customLong("vm-network"),
        help:
            "Every VM gets a network of its own, its host links numbered from this IPv4 pool (a /30 each; it must not overlap the host's networks): guests reach neither this host nor one another nor private ranges, and the ingress reaches their ports. Needs root, ip, nft and nsenter. off (the default for now): QEMU's user-mode network instead (no isolation from this host, no ingress, no egress policy)."
    )
    var vmNetwork = "off"
    @Option(
        help:
            "What guests may reach when their VM has no policy of its own: allow (the public internet) or deny (nothing)."
    )
    var egress = "allow"
    @Option(
        name: .customLong("dns-upstream"),
        help:
            "A DNS server (IPv4[:port]) the guests' resolver asks, with --vm-network; repeat for more. Default: the name servers of /etc/resolv.conf."
    )
    var dnsUpstream: [String] = []
    @Option(
        name: .customLong("ingress-port"),
        help:
            "Port of the HTTP ingress, on --host: http://{vm-id}-{port}.{public domain}:PORT/ reaches a VM's exposed port (Freestyle ports, InstaVM shares). 0: no ingress."
    )
    var ingressPort = 8081
    @Option(
        name: .customLong("public-domain"),
        help:
            "The domain VM host names end in (default localhost: *.localhost reaches this host in browsers and curl without DNS set-up)."
    )
    var publicDomain = "localhost"
    @Flag(
        name: .customLong("keep-vms-running"),
        help:
            "At SIGTERM/SIGINT leave running VMs running, and the storage process serving their files, for the next furcate serve to take over (an upgrade without stopping VMs); default: suspend them into the store and stop the storage process."
    )
    var keepVMsRunning = false

    func validate() throws {
        guard (1...65535).contains(port) else { throw ValidationError("--port must be 1 to 65535, not \(port)") }
        guard idleTimeout >= 0 else {
            throw ValidationError("--idle-timeout must be 0 (never) or more seconds, not \(idleTimeout)")
        }
        guard (0...64).contains(warmPool) else { throw ValidationError("--warm-pool must be 0 to 64, not \(warmPool)") }
        if let v = maxVCPUs, !(1...(1 << 16)).contains(v) {
            throw ValidationError("--max-vcpus must be 1 to 65536, not \(v)")
        }
        if let m = maxGuestMemoryGib, !(1...(1 << 20)).contains(m) {
            throw ValidationError("--max-guest-memory-gib must be 1 to 1048576, not \(m)")
        }
        if let b = concurrentBoots, !(1...1024).contains(b) {
            throw ValidationError("--concurrent-boots must be 1 to 1024, not \(b)")
        }
        do { _ = try Self.compression(snapshotCompression) } catch let e as FurcateError {
            throw ValidationError("--snapshot-compression: \(e.message)")
        }
        if vmNetwork != "off" {
            do { _ = try IPv4Network(parsing: vmNetwork) } catch let e as FurcateError {
                throw ValidationError("--vm-network: \(e.message) (or off)")
            }
        }
        for d in dnsUpstream {
            do { _ = try DNSServer(parsing: d) } catch let e as FurcateError {
                throw ValidationError("--dns-upstream: \(e.message)")
            }
        }
        guard (0...65535).contains(ingressPort), ingressPort != port else {
            throw ValidationError("--ingress-port must be 0 (none) or 1 to 65535 and not --port, not \(ingressPort)")
        }
        let labels = publicDomain.split(separator: ".", omittingEmptySubsequences: false)
        guard publicDomain.utf8.count <= 200, !labels.isEmpty,
            labels.allSatisfy({ l in
                !l.isEmpty && l.count <= 63 && l.first != "-" && l.last != "-"
                    && l.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
            })
        else {
            throw ValidationError(
                "--public-domain must be a DNS name (letters, digits, hyphens, dots), not '\(publicDomain.prefix(80))'")
        }
        guard ["allow", "deny"].contains(egress) else {
            throw ValidationError("--egress must be allow or deny, not '\(egress)'")
        }
        if let q = storageQuotaGb, !(1...(1 << 20)).contains(q) {
            throw ValidationError("--storage-quota-gb must be 1 to 1048576, not \(q)")
        }
    }

    /// `--snapshot-compression`'s setting (nil for none).
    /// - Throws: `.invalidArgument` naming what is wrong.
    static func compression(_ spelling: String) throws -> SnapshotCompression? {
        let parts = spelling.split(separator: ":", maxSplits: 1).map(String.init)
        guard let algorithm = parts.first, ["none", "zstd", "lz4"].contains(algorithm) else {
            throw FurcateError(.invalidArgument, "'\(spelling)' is not none, zstd, zstd:LEVEL or lz4")
        }
        if algorithm == "none" {
            guard parts.count == 1 else { throw FurcateError(.invalidArgument, "none takes no level") }
            return nil
        }
        var level: Int?
        if parts.count == 2 {
            guard let l = Int(parts[1]) else { throw FurcateError(.invalidArgument, "'\(parts[1])' is not a level") }
            level = l
        }
        let c = SnapshotCompression(enabled: true, algorithm: algorithm, level: level)
        _ = try c.codec(fallback: .default)
        return c
    }

    func run() throws {
        bootstrapOnce
        let (data, host, port, idleTimeout, quota, warmPool) = (
            data, host, port, idleTimeout, storageQuotaGb.map { UInt64($0) << 30 }, warmPool
        )
        let (ingressPort, publicDomain) = (ingressPort, publicDomain.lowercased())
        var capacity = VMCapacity.host(accelerator: .detect())
        if let v = maxVCPUs { capacity.vcpus = v }
        if let m = maxGuestMemoryGib { capacity.memoryMiB = m << 10 }
        let (concurrentBoots, keep) = (concurrentBoots, keepVMsRunning)
        let compression = try Self.compression(snapshotCompression)
        var networks: NetworkHost?
        if vmNetwork != "off" {
            let host = NetworkHost(
                options: try NetworkOptions(
                    pool: IPv4Network(parsing: vmNetwork), tag: NetworkOptions.tag(for: data.layout.root),
                    dnsUpstreams: dnsUpstream.isEmpty ? nil : try dnsUpstream.map { try DNSServer(parsing: $0) }))
            if host.options.dnsUpstreams.isEmpty {
                Logger(label: "furcate.serve").warning(
                    "no DNS server for the guests' resolver (/etc/resolv.conf names none): give --dns-upstream")
            }
            do { try host.checkHost() } catch let e as FurcateError {
                throw FurcateError(
                    e.code,
                    "\(e.message); or start with --vm-network off to run guests on QEMU's user-mode network (they then reach this host's loopback, and nothing reaches their ports)"
                )
            }
            networks = host
        }
        let egress: EgressPolicy = egress == "deny" ? .denyAll : .allowPublicInternet
        try runBlocking { [capacity, networks] in
            let logger = Logger(label: "furcate.serve")
            let engine = try LocalEngine(
                data, warmPool: warmPool, capacity: capacity, concurrentBoots: concurrentBoots, storageProcess: true,
                snapshotCompression: compression, networks: networks, egress: egress)
            let l = engine.layout
            let group: ServiceGroup
            do {
                let recovered = await engine.vms.recover()
                let interrupted = await engine.builds.recover()
                var api = try engine.engine(quotaBytes: quota)
                let unowned = await api.removeUnownedVMs()
                for id in unowned {
                    logger.warning(
                        "deleted a VM no account owned (its operation was cut off)", metadata: ["vm.id": "\(id)"])
                }
                for id in interrupted {
                    logger.warning("a build was interrupted by the server's end", metadata: ["build.id": "\(id)"])
                }
                if let path = try api.keys.bootstrapAdmin(secretPath: l.root + "/admin-key") {
                    FileHandleStderr.write(
                        "furcate: created the first API key (account admin); its secret is in \(path)\n")
                }
                api.defaultIdleTimeoutSeconds = idleTimeout
                if ingressPort != 0 { api.ingress = IngressSite(publicDomain: publicDomain, port: ingressPort) }
                let app = APIServer.buildApplication(api, host: host, port: port, logger: logger)
                logger.notice(
                    "serving",
                    metadata: [
                        "address": "\(host):\(port)", "data": "\(l.root)", "vms.resumed": "\(recovered.count)",
                        "builds.interrupted": "\(interrupted.count)", "vms.unowned_removed": "\(unowned.count)",
                        "capacity.vcpus": "\(capacity.vcpus ?? 0)",
                        "capacity.memory_mib": "\(capacity.memoryMiB ?? 0)",
                    ])
                FileHandleStderr.write("furcate: serving http://\(host):\(port) (data \(l.root))\n")
                // Stopped in reverse order at SIGTERM/SIGINT: the HTTP server, the policies, the
                // warm pool, the VMs (running ones are suspended into the store and resumed by the
                // next `furcate serve`; with --keep-vms-running they go on running), then the
                // storage process (left serving with --keep-vms-running).
                var services: [any Service] = [
                    EnginePart(name: "store") { await engine.close(deleting: [], stopStorage: !keep) },
                    EnginePart(name: "vms") {
                        if keep { await engine.vms.detachAll() } else { await engine.vms.shutdown() }
                    },
                    EnginePart(name: "warm-pool") { await engine.vms.drainWarmPool() },
                    PolicyService(engine: api),
                    app,
                ]
                if let site = api.ingress {
                    services.append(
                        IngressServer(
                            options: IngressOptions(host: host, port: site.port),
                            router: EngineIngressRouter(engine: api, site: site), logger: logger))
                }
                if case .storageProcess(let storage) = engine.host {
                    services.append(StorageWatch(storage: storage, vms: engine.vms, logger: logger))
                }
                group = ServiceGroup(
                    configuration: .init(
                        services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
            } catch {
                await engine.vms.shutdown()
                await engine.close(deleting: [])
                throw error
            }
            try await group.run()
        }
    }
}

/// A part of the engine in `furcate serve`'s service group: it holds still while the server
/// runs, and `stop` ends it at graceful shutdown (or when the group is cancelled).
struct EnginePart: Service {
    let name: String
    let stop: @Sendable () async -> Void

    func run() async throws {
        try? await gracefulShutdown()
        await stop()
    }
}

/// Watches the storage process while the server runs: when it ends (killed, crashed), the VMs
/// on its files are lost (reported, restartable from their last synced disk) and a new one is
/// started, so that start boots them again. Ends at graceful shutdown.
struct StorageWatch: Service {
    let storage: StorageProcess
    let vms: VMService
    let logger: Logger

    func run() async throws {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            do { try await cancelWhenGracefulShutdown { try await storage.waitForExit() } } catch { return }
            guard !Task.isShuttingDownGracefully, storage.hasExited else { return }
            let pid = storage.pid
            logger.error("the storage process ended; its VMs are lost", metadata: ["storage.pid": "\(pid)"])
            await vms.storageEnded("the storage process (pid \(pid)) serving its files ended")
            do {
                try storage.restart()
                logger.notice("started a new storage process", metadata: ["storage.pid": "\(storage.pid)"])
            } catch {
                logger.critical("cannot start a new storage process", metadata: ["error": "\(error)"])
                throw error
            }
        }
    }
}
