import FurcateCore

/// A VM's lifecycle state, with the values of the Freestyle `VMState` document.
public enum VMState: String, Sendable, Codable, CaseIterable {
    /// Its image or build is being prepared.
    case building
    /// QEMU is starting (a boot, a restore, a resume).
    case starting
    /// The guest runs.
    case running
    /// Being snapshotted to be suspended.
    case suspending
    /// No process; memory, disk and device state are a store snapshot, resumed on demand.
    case suspended
    /// No process; stopped or killed. Its disk remains until the VM is deleted.
    case stopped
    /// Its process vanished unexpectedly (crashed, killed from outside, or the server
    /// restarted under it): its memory is gone, its disk is kept (`VMInfo.lostReason` says
    /// why). Start boots it again from that disk; stop/kill make it stopped.
    case lost

    /// The transition table: `to` states reachable from each state. A transition not listed
    /// is a `.invalidState` error naming both states, never a crash.
    static let transitions: [VMState: Set<VMState>] = [
        .building: [.starting, .stopped, .lost],
        .starting: [.running, .stopped, .lost, .suspended],
        .running: [.suspending, .stopped, .lost],
        .suspending: [.suspended, .running, .lost, .stopped],
        .suspended: [.starting, .stopped, .lost],
        .stopped: [.starting],
        .lost: [.stopped, .starting],
    ]

    /// True when `self → to` is a legal transition.
    public func canTransition(to: VMState) -> Bool { Self.transitions[self]?.contains(to) ?? false }

    /// Checks `self → to`.
    /// - Throws: `.invalidState` saying which VM is in which state.
    func checkTransition(to: VMState, vm: String, operation: String) throws {
        guard canTransition(to: to) else {
            throw FurcateError(.invalidState, "VM \(vm) is \(rawValue); cannot \(operation)", operation: operation)
        }
    }
}

/// Where a VM's RAM lives.
public enum MemoryMode: String, Sendable, Codable, CaseIterable {
    /// (a) Each VM's RAM is its own writable store file, mapped shared: a snapshot copies no
    /// RAM (one O(1) store snapshot of the file), a fork clones it in O(1).
    case shared = "a"
    /// (b) Forks map their snapshot's memory file privately: all forks of one snapshot share
    /// its page cache, and what a fork writes is anonymous memory of its QEMU process.
    case privateBase = "b"
}
