// One VM's runtime: what exists because its QEMU runs, owned by one object with one way out.
import Hypervisor

/// The runtime of one VM whose QEMU runs (or waits in the warm pool, named for the VM it will
/// become): the process, the VM's one guest-agent connection (the channel takes one client at
/// a time; requests multiplex over it), the background work that readies its guest after a
/// boot or restore, and whether its agent already ran the forks' freshening.
///
/// `VMService.instances` holds one per VM with a process, and `VMService.tearDown(_:)` is the
/// only way one leaves it: every ending path — stop, kill, suspend, delete, QEMU's own exit, a
/// failed create or restore, a discarded pool entry — goes through it, so nothing of a VM's
/// runtime outlives its process. What outlives the process (the VM record, its per-VM lock,
/// its snapshots) belongs to the service.
struct VMInstance {
    let process: QEMUProcess
    /// The VM's guest-agent connection once one answered.
    var agent: AgentClient?
    /// What makes the guest ready for the user (see `VMService.awaitFreshened`).
    var readiness: GuestReadiness?
    /// The agent ran the forks' freshening before a snapshot (`primeForForks`); a new process
    /// (stop and start) is a new instance and needs it again.
    var primedForForks = false

    init(process: QEMUProcess) { self.process = process }
}

/// What makes a VM's guest ready for the user once its QEMU runs.
enum GuestWork: Sendable {
    /// A cold boot: the guest agent's first answer (which also frees the boot's host slot).
    case boot
    /// A restore: the freshening, with a new identity or not.
    case restore(newIdentity: Bool)
}

/// The background task doing a VM's `GuestWork`; true when its agent did it.
struct GuestReadiness {
    var task: Task<Bool, Never>
    var work: GuestWork
}
