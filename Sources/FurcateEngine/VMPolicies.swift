import Foundation
import FurcateCore
import Logging
import ServiceLifecycle
import VMService

/// How long a VM is kept (Freestyle's VmPersistence): `persistent` until deleted; `sticky`
/// (priority 0–10, default 5) may be deleted — lowest priority, least recently used first —
/// when its account passes its storage quota, but only while it is not running; `ephemeral`
/// is deleted when its idle timeout passes or once stopped (see `DeleteEvent`). Encoded as the
/// document has it: `{"type": "ephemeral", "deleteEvent": "OnStop"}`.
public enum VMPersistence: Codable, Sendable, Equatable {
    case persistent
    case sticky(priority: Int)
    /// `deleteEvent` as given (nil: the default, `OnSuspend`).
    case ephemeral(deleteEvent: DeleteEvent?)

    /// An ephemeral VM's end.
    public enum DeleteEvent: String, Codable, Sendable {
        /// Deleted where it would be suspended (the default).
        case onSuspend = "OnSuspend"
        /// Suspended when idle as others are; deleted once stopped.
        case onStop = "OnStop"
    }

    /// A sticky VM's default priority.
    public static let sticky = VMPersistence.sticky(priority: 5)

    /// An eviction candidate's priority (lower goes first); nil unless sticky.
    public var stickyPriority: Int? {
        if case .sticky(let p) = self { return p }
        return nil
    }

    var deletedOnStop: Bool { self == .ephemeral(deleteEvent: .onStop) }
    var deletedOnSuspend: Bool {
        if case .ephemeral(let e) = self { return e != .onStop }
        return false
    }

    private enum Keys: String, CodingKey { case type, deleteEvent }

    /// `persistent` and `sticky` read and write as a snapshot's persistence does.
    /// - Throws: `.invalidArgument` naming the field for an unknown type, a priority out of
    ///   0–10 or an unknown delete event.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: Keys.self)
        let type = try c.decode(String.self, forKey: .type)
        switch type {
        case "persistent", "sticky":
            switch try SnapshotPersistence(from: decoder) {
            case .persistent: self = .persistent
            case .sticky(let p): self = .sticky(priority: p)
            }
        case "ephemeral":
            let raw = try c.decodeIfPresent(String.self, forKey: .deleteEvent)
            guard raw == nil || DeleteEvent(rawValue: raw ?? "") != nil else {
                throw FurcateError(.invalidArgument, "persistence.deleteEvent must be OnStop or OnSuspend")
            }
            self = .ephemeral(deleteEvent: raw.flatMap(DeleteEvent.init(rawValue:)))
        default:
            throw FurcateError(
                .invalidArgument, "persistence.type must be sticky, ephemeral or persistent, not '\(type.prefix(40))'")
        }
    }

    /// Encodes `{"type": …}` (with `deleteEvent` for ephemeral), the shape `init(from:)` reads.
    public func encode(to encoder: any Encoder) throws {
        switch self {
        case .persistent: try SnapshotPersistence.persistent.encode(to: encoder)
        case .sticky(let p): try SnapshotPersistence.sticky(priority: p).encode(to: encoder)
        case .ephemeral(let e):
            var c = encoder.container(keyedBy: Keys.self)
            try c.encode("ephemeral", forKey: .type)
            try c.encodeIfPresent(e, forKey: .deleteEvent)
        }
    }
}

/// What the engine keeps about an account's VM beyond VMService's record, persisted with it.
public struct VMPolicy: Codable, Sendable, Equatable {
    /// Sticky (evictable under a quota), ephemeral (deleted when it stops) or persistent.
    public var persistence: VMPersistence
    /// Seconds without API activity after which a running VM is suspended (ephemeral ones are
    /// deleted). Nil or 0: never.
    public var idleTimeoutSeconds: Int?
    /// When the VM is deleted whatever it does (InstaVM's `vm_lifetime_seconds`), Unix seconds.
    public var expiresAt: Double?

    /// A policy with the given fields; nil ones mean none.
    public init(persistence: VMPersistence = .sticky, idleTimeoutSeconds: Int? = nil, expiresAt: Double? = nil) {
        self.persistence = persistence
        self.idleTimeoutSeconds = idleTimeoutSeconds
        self.expiresAt = expiresAt
    }
}

/// What one pass of the policies did to a VM or snapshot.
public enum PolicyAction: Sendable, Equatable {
    case expired(vm: String)
    case suspendedIdle(vm: String)
    case deletedIdle(vm: String)
    case deletedEphemeral(vm: String)
    case evictedVM(String, account: String)
    case evictedSnapshot(String, account: String)
}

/// The engine's VM policies: lifetimes, idle suspension and storage quotas. The rules are
/// persisted (`vm_policies` in the owners' database); activity — the last API request that touched
/// a VM, and requests still in flight — lives in this process (a restart counts as activity).
/// `tick` applies the rules once; `PolicyService` calls it every few seconds under
/// `furcate serve`.
public actor VMPolicies {
    private let owners: OwnerStore
    /// The persisted policies, read once (this actor is their only writer).
    private var cache: [String: VMPolicy]?
    private var lastActivity: [String: Double] = [:]
    private var inFlight: [String: Int] = [:]
    /// Bytes each account may keep in VMs and snapshots before sticky ones are evicted; nil:
    /// no quota.
    public var quotaBytes: UInt64?
    let logger = Logger(label: "furcate.engine.policies")

    /// The policies of the VMs in `owners`, under a quota of `quotaBytes` per account (nil: none).
    public init(owners: OwnerStore, quotaBytes: UInt64? = nil) {
        self.owners = owners
        self.quotaBytes = quotaBytes
    }

    /// Sets the per-account storage quota (nil: none).
    public func setQuota(_ bytes: UInt64?) { quotaBytes = bytes }

    /// Sets VM `id`'s policy and counts it as activity.
    public func set(_ id: String, _ policy: VMPolicy) throws {
        try owners.savePolicy(id, policy)
        _ = try loaded()
        cache?[id] = policy
        touch(id)
    }

    /// VM `id`'s policy, if it has one.
    public func policy(_ id: String) throws -> VMPolicy? { try loaded()[id] }

    /// Every VM's policy, by id.
    public func all() throws -> [String: VMPolicy] { try loaded() }

    private func loaded() throws -> [String: VMPolicy] {
        if let cache { return cache }
        let all = try owners.allPolicies()
        cache = all
        return all
    }

    /// Forgets VM `id`'s policy and activity.
    public func remove(_ id: String) throws {
        try owners.removePolicy(id)
        cache?[id] = nil
        lastActivity[id] = nil
        inFlight[id] = nil
    }

    /// Marks a VM used now.
    public func touch(_ id: String, now: Double = Date().timeIntervalSince1970) { lastActivity[id] = now }

    /// A request on the VM starts (it is not idle until every one has ended).
    public func begin(_ id: String) {
        inFlight[id, default: 0] += 1
        touch(id)
    }

    /// Ends one request on VM `id` (see `begin`).
    public func end(_ id: String) {
        inFlight[id] = max(0, (inFlight[id] ?? 1) - 1)
        touch(id)
    }

    /// Whether a request on the VM is in flight.
    public func busy(_ id: String) -> Bool { (inFlight[id] ?? 0) > 0 }

    /// Applies every rule once, at `now` (Unix seconds): lifetimes, idle timeouts, quotas.
    @discardableResult
    public func tick(engine: Engine, now: Double = Date().timeIntervalSince1970) async -> [PolicyAction] {
        var done: [PolicyAction] = []
        let vms = await engine.vms.list()
        for vm in vms {
            guard let p = try? policy(vm.id) else { continue }
            let last =
                lastActivity[vm.id]
                ?? {
                    lastActivity[vm.id] = now; return now
                }()
            do {
                if let exp = p.expiresAt, now >= exp {
                    try await engine.forgetVM(vm.id)
                    done.append(.expired(vm: vm.id))
                } else if (vm.state == .stopped && p.persistence.deletedOnStop)
                    || (vm.state == .suspended && p.persistence.deletedOnSuspend)
                {
                    try await engine.forgetVM(vm.id)
                    done.append(.deletedEphemeral(vm: vm.id))
                } else if vm.state == .running, let idle = p.idleTimeoutSeconds, idle > 0, (inFlight[vm.id] ?? 0) == 0,
                    now - last >= Double(idle)
                {
                    if p.persistence.deletedOnSuspend {
                        try await engine.forgetVM(vm.id)
                        done.append(.deletedIdle(vm: vm.id))
                    } else {
                        _ = try await engine.vms.suspend(vm.id)
                        done.append(.suspendedIdle(vm: vm.id))
                    }
                }
            } catch {
                logger.warning("policy not applied", metadata: ["vm.id": "\(vm.id)", "error": "\(error)"])
            }
        }
        if let quota = quotaBytes { done += await enforce(quota: quota, engine: engine) }
        for a in done { logger.info("policy applied", metadata: ["action": "\(a)"]) }
        return done
    }

    /// Something an account keeps in the store, as the quota sees it.
    private struct Held {
        var vm: String?
        var snapshot: SnapshotRecord?
        var bytes: UInt64
        var evictable: Bool
        var priority: Int
        var lastUsed: Double
    }

    /// Evicts sticky VMs (not running) and sticky snapshots — lowest priority first, then least
    /// recently used — while an account holds more than `quota` bytes. Bytes are counted per
    /// VM and snapshot as their files hold them (a fork counts its whole disk), each snapshot's
    /// bytes once however many records name them.
    private func enforce(quota: UInt64, engine: Engine) async -> [PolicyAction] {
        var held: [String: [Held]] = [:]
        for vm in await engine.vms.list() {
            guard let p = try? policy(vm.id), let account = engine.owners.owner(vm.id) else { continue }
            let bytes = (try? await engine.vms.vmStoredBytes(vm.id)) ?? 0
            let idle = vm.state == .suspended || vm.state == .stopped || vm.state == .lost
            held[account, default: []].append(
                Held(
                    vm: vm.id, bytes: bytes, evictable: p.persistence.stickyPriority != nil && idle,
                    priority: p.persistence.stickyPriority ?? 5,
                    lastUsed: lastActivity[vm.id] ?? vm.createdAt))
        }
        var counted: Set<String> = []
        for s in (try? engine.owners.snapshots()) ?? [] where !s.deleted {
            let r = await engine.resolve(s)
            guard r.state == .ready, let target = r.target, counted.insert(target).inserted else { continue }
            let bytes = (try? await engine.vms.snapshotStoredBytes(target)) ?? 0
            held[s.account, default: []].append(
                Held(
                    snapshot: s, bytes: bytes, evictable: s.persistence.stickyPriority != nil,
                    priority: s.persistence.stickyPriority ?? 5,
                    lastUsed: s.lastUsedAt ?? s.createdAt))
        }
        var done: [PolicyAction] = []
        for (account, items) in held.sorted(by: { $0.key < $1.key }) {
            var usage = items.reduce(0) { $0 + $1.bytes }
            guard usage > quota else { continue }
            for item in items.filter(\.evictable).sorted(by: { ($0.priority, $0.lastUsed) < ($1.priority, $1.lastUsed) }
            ) where usage > quota {
                do {
                    if let id = item.vm {
                        try await engine.forgetVM(id)
                        done.append(.evictedVM(id, account: account))
                    } else if let s = item.snapshot {
                        try await engine.deleteSnapshot(s)
                        done.append(.evictedSnapshot(s.id, account: account))
                    }
                    usage -= min(usage, item.bytes)
                } catch {
                    logger.warning("eviction failed", metadata: ["account": "\(account)", "error": "\(error)"])
                }
            }
            if usage > quota {
                logger.warning(
                    "account over its storage quota with nothing sticky left to evict",
                    metadata: ["account": "\(account)", "bytes": "\(usage)", "quota": "\(quota)"])
            }
        }
        return done
    }
}

/// Runs `VMPolicies.tick` every `interval` until the service group shuts down.
public struct PolicyService: Service {
    let engine: Engine
    let interval: Duration

    /// A service ticking `engine`'s policies every `interval`.
    public init(engine: Engine, interval: Duration = .seconds(5)) {
        self.engine = engine
        self.interval = interval
    }

    /// Ticks until cancelled or the service group shuts down.
    public func run() async throws {
        while !Task.isCancelled && !Task.isShuttingDownGracefully {
            await engine.policies.tick(engine: engine)
            try? await Task.sleep(for: interval)
        }
    }
}
