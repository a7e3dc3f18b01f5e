import Foundation
import FurcateCore
import GuestAgentProtocol
import Hypervisor

/// A running VM's guest as a dialect uses it: typed operations on its agent, each of which
/// answers with the kind its request has or throws (`AgentClient` checks). A dialect gets one
/// from `Engine.guest(_:wake:)`, which also counts the request as the VM's activity.
public struct Guest: Sendable {
    let agent: AgentClient

    /// Runs a program in the guest and waits for it.
    public func exec(_ e: ExecRequest) async throws -> ExecResult { try await agent.exec(e) }

    /// The guest's services with their states.
    public func services() async throws -> [ServiceStatus] { try await agent.services() }
    /// One service's state.
    /// - Throws: `AgentError` `not_found` for a service that does not exist.
    public func serviceStatus(_ name: String) async throws -> ServiceStatus { try await agent.serviceStatus(name) }
    /// Creates a service in the guest and starts it.
    public func createService(_ spec: ServiceSpec) async throws { try await agent.createService(spec) }
    /// `action`: start, stop, restart or delete.
    public func controlService(_ name: String, _ action: String, timeout: Duration = .seconds(120)) async throws {
        try await agent.controlService(name, action, timeout: timeout)
    }
    /// A service's last `lines` log lines (all when nil), those after `since` (Unix seconds) only.
    public func serviceLogs(_ name: String, lines: Int?, since: Double?) async throws -> ServiceLogs {
        try await agent.serviceLogs(name, lines: lines, since: since)
    }

    /// The guest's terminals.
    public func terminals() async throws -> [TerminalInfo] { try await agent.terminals() }
    /// A terminal's last `lines` lines of output (all it keeps when nil).
    public func terminalLines(_ name: String, lines: Int?) async throws -> [String] {
        try await agent.terminalLines(name, lines: lines)
    }
    /// What the terminal shows, as the bytes an xterm-256color terminal would draw.
    public func terminalBytes(_ name: String) async throws -> Data { try await agent.terminalBytes(name) }

    /// A streaming request (`stats`, `watch`): its events, then its final response. `cancel`
    /// ends it in the guest; call it when the consumer goes away before the end.
    public func stream(_ request: AgentRequest) throws -> GuestStream {
        let (id, items) = try agent.stream(request)
        return GuestStream(items: items, id: id, agent: agent)
    }
}

/// The events of one streaming guest request.
public struct GuestStream: Sendable {
    /// The stream's events, ending with its final answer or an error.
    public let items: AsyncThrowingStream<AgentStreamItem, any Error>
    let id: UInt32
    let agent: AgentClient

    /// Ends the request in the guest (its final response follows on `items`).
    public func cancel() async { try? await agent.cancel(id) }
}
