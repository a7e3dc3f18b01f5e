// Typed control of a running QEMU. The domain above (VMService) speaks of pausing, resuming,
// saving and loading device state; only this file and the QMP client name QMP commands.
import FurcateCore

/// How a save or load of device state ended (QEMU's MIGRATION event).
public enum MigrationOutcome: Sendable, Equatable {
    case completed
    /// QEMU's description of the failure when it gave one (`query-migrate`'s `error-desc`).
    case failed(String?)
    case cancelled
}

extension QEMUProcess {
    /// Stops the vCPUs (QMP `stop`). Not an error when they are stopped.
    public func pause() async throws { try await qmp.execute("stop") }

    /// Lets the vCPUs run (QMP `cont`). Not an error when they run.
    public func resume() async throws { try await qmp.execute("cont") }

    /// Presses the ACPI power button: a guest without an agent powers off by it.
    public func pressPowerButton(timeout: Duration = .seconds(1)) async throws {
        try await qmp.execute("system_powerdown", timeout: timeout)
    }

    /// Grows block device `device` to `bytes`; QEMU grows the file and tells the guest.
    public func resizeBlockDevice(_ device: String, to bytes: UInt64) async throws {
        try await qmp.execute("block_resize", ["device": .string(device), "size": .number(Double(bytes))])
    }

    /// QEMU's run status (`running`, `paused`, `inmigrate`, …), for diagnostics.
    public func runStatus(timeout: Duration = .seconds(2)) async throws -> String {
        try await qmp.execute("query-status", timeout: timeout)["status"]?.string ?? "unknown"
    }

    /// Sets the capabilities of the next save or load: `x-ignore-shared` (RAM on a shared file
    /// is not streamed) as asked, and `events` (MIGRATION events mark the end, so nothing polls
    /// QEMU while it saves or loads; a poll's reply would wake this process and cost QEMU the
    /// CPU in the middle of it).
    public func prepareMigration(ignoreShared: Bool) async throws {
        try await qmp.execute(
            "migrate-set-capabilities",
            [
                "capabilities": [
                    ["capability": "x-ignore-shared", "state": .bool(ignoreShared)],
                    ["capability": "events", "state": true],
                ]
            ])
    }

    /// Has QEMU write its device state (and RAM it does not share) to the unix socket at
    /// `socket`, where the caller listens. `migrationOutcome` reports the end. The caller has
    /// paused the vCPUs.
    public func startSavingDeviceState(to socket: String) async throws {
        qmp.discardEvents(named: "MIGRATION")
        try await qmp.execute("migrate", ["uri": .string("unix:\(socket)")])
    }

    /// Has a QEMU started with `-incoming defer` listen on `socket` for device state, which the
    /// caller then sends. `migrationOutcome` reports the end; `resumedAfterLoad` whether QEMU
    /// let the guest run by itself.
    public func startLoadingDeviceState(from socket: String) async throws {
        qmp.discardEvents(named: "MIGRATION")
        qmp.discardEvents(named: "RESUME")
        try await qmp.execute("migrate-incoming", ["uri": .string("unix:\(socket)")])
    }

    /// Waits for the MIGRATION event that ends the save or load started last.
    /// - Throws: `.timedOut` after `timeout`; `.hypervisor` when the QMP connection closes
    ///   first (QEMU exits after a failed load).
    public func migrationOutcome(timeout: Duration = .seconds(60)) async throws -> MigrationOutcome {
        let end = try await qmp.waitForEvent("MIGRATION", timeout: timeout) { e in
            ["completed", "failed", "cancelled"].contains(e["data"]?["status"]?.string ?? "")
        }
        switch end["data"]?["status"]?.string {
        case "completed": return .completed
        case "cancelled": return .cancelled
        default: return .failed((try? await qmp.execute("query-migrate", timeout: .seconds(2)))?["error-desc"]?.string)
        }
    }

    /// After a load completed: whether QEMU already let the guest run (a stream saved without
    /// run state resumes as soon as it is loaded; RESUME comes just before the end). When it
    /// did not, the caller `resume`s.
    public func resumedAfterLoad() -> Bool { qmp.takeEvent(named: "RESUME") != nil }
}
