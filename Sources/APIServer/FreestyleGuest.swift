import Foundation
import FurcateCore
import FurcateEngine
import GuestAgentProtocol
import Hummingbird

/// Freestyle's operations inside a VM through its agent: systemd services and logs, terminals,
/// the stats and file-watch NDJSON streams; and resize and optimize.
extension FreestyleRoutes {
    struct ServiceListItem: Codable { var name: String }
    struct ServiceList: ResponseCodable { var services: [ServiceListItem] }
    struct CreateServiceResponse: ResponseCodable {
        var success: Bool
        var message, serviceName: String
    }
    struct DeleteServiceResponse: ResponseCodable {
        var success: Bool
        var message: String
    }
    struct ServiceStatusResponse: ResponseCodable {
        var name, activeState, subState, loadState, description: String
        var mainPid: Int32?
        var restarts: Int
    }
    struct LogItem: Codable {
        var message, timestamp: String
        var priority, unit: String?
    }
    struct LogsResponse: ResponseCodable { var logs: [LogItem] }
    struct BatchRequest: Decodable {
        struct Item: Decodable { var id: String }
        var services: [Item]
    }
    struct BatchResult: Codable {
        var serviceId: String
        var success: Bool
        var message: String
    }
    struct BatchResponse: ResponseCodable { var results: [BatchResult] }
    struct TerminalSession: Codable {
        var name, status: String
        var created: String?
    }
    struct TerminalList: ResponseCodable { var terminals: [TerminalSession] }
    struct TerminalLine: Codable {
        var line: String
        var timestamp: String?
    }
    struct TerminalLogs: ResponseCodable { var logs: [TerminalLine] }
    struct TerminalOutput: ResponseCodable { var output: String }
    struct ResizeResponse: ResponseCodable {
        var id: String
        var rootfsSizeGb: Int
        var message: String
    }
    struct OptimizeResponse: ResponseCodable { var id, message: String }

    /// Service and terminal names as the guest takes them.
    static func guestName(_ ctx: APIContext, _ param: String, what: String) throws -> String {
        try guestName(try ctx.parameters.require(param), what: what)
    }

    static func guestName(_ n: String, what: String) throws -> String {
        guard !n.isEmpty, n.utf8.count <= 128,
            n.allSatisfy({ $0.isASCII && ($0.isLetter || $0.isNumber || "-_.@".contains($0)) }), n.first != "."
        else {
            throw APIError(
                .badRequest, "BAD_REQUEST", "'\(n.prefix(60))' is not a \(what) name (letters, digits, - _ . @)")
        }
        return n
    }

    func registerGuest(on v1: RouterGroup<APIContext>) {
        v1.get("vms/{vm_id}/systemd/services") { _, ctx in
            let list = try await agent(ctx).services()
            return ServiceList(services: list.map { ServiceListItem(name: $0.name) })
        }
        v1.post("vms/{vm_id}/systemd/services") { req, ctx in
            let a = try await agent(ctx)
            let spec = try RequestBodies.decode(UnitRequest.self, from: try await req.body.collect(upTo: 1 << 20)).spec
            if try await a.services().contains(where: { $0.name == spec.name }) {
                throw APIError(.conflict, "SERVICE_ALREADY_EXISTS", "a service \(spec.name) exists; delete it first")
            }
            try await a.createService(spec)
            return CreateServiceResponse(
                success: true, message: "created and started \(spec.name)", serviceName: spec.name)
        }
        v1.delete("vms/{vm_id}/systemd/services/{service_id}") { _, ctx in
            let name = try Self.guestName(ctx, "service_id", what: "service")
            try await serviceCall(ctx, name) { try await $0.controlService(name, "delete") }
            return DeleteServiceResponse(success: true, message: "deleted \(name)")
        }
        v1.get("vms/{vm_id}/systemd/services/{service_id}/status") { _, ctx in
            let name = try Self.guestName(ctx, "service_id", what: "service")
            let s = try await serviceCall(ctx, name) { try await $0.serviceStatus(name) }
            return ServiceStatusResponse(
                name: s.name, activeState: s.activeState, subState: s.subState, loadState: s.loadState,
                description: s.description,
                mainPid: s.mainPID, restarts: s.restarts)
        }
        v1.get("vms/{vm_id}/systemd/services/{service_id}/logs") { req, ctx in
            let name = try Self.guestName(ctx, "service_id", what: "service")
            let lines = try Self.intQuery(req, "lines", range: 0...100_000) ?? 200
            let since = try req.uri.queryParameters["since"].map { try Self.time(String($0), what: "since") }
            switch try await serviceCall(ctx, name, { try await $0.serviceLogs(name, lines: lines, since: since) }) {
            case .timed(let entries):
                return LogsResponse(
                    logs: entries.map {
                        LogItem(message: $0.text, timestamp: Self.iso($0.time), priority: nil, unit: name)
                    })
            case .lines(let out):  // an agent from before timed logs (a VM restored from an old snapshot)
                guard since == nil else {
                    throw APIError(
                        .badRequest, "UNSUPPORTED_FIELD", "this VM's guest agent predates 'since'; use lines")
                }
                return LogsResponse(logs: out.map(Self.logItem(unit: name)))
            }
        }
        for action in ["start", "stop", "restart"] {
            v1.post("vms/{vm_id}/systemd/\(action)") { req, ctx in
                let a = try await agent(ctx)
                let body = try await req.decode(as: BatchRequest.self, context: ctx)
                guard body.services.count <= 100 else {
                    throw APIError(.badRequest, "BAD_REQUEST", "at most 100 services per call")
                }
                var results: [BatchResult] = []
                for s in body.services {
                    do {
                        try await a.controlService(s.id, action, timeout: .seconds(660))
                        results.append(BatchResult(serviceId: s.id, success: true, message: "\(action) done"))
                    } catch let e as FurcateError {
                        results.append(BatchResult(serviceId: s.id, success: false, message: e.message))
                    }
                }
                return BatchResponse(results: results)
            }
        }
        v1.get("vms/{vm_id}/terminals") { _, ctx in
            let ts = try await agent(ctx).terminals()
            return TerminalList(
                terminals: ts.map {
                    TerminalSession(name: $0.name, status: $0.status, created: Self.iso(Double($0.created)))
                })
        }
        v1.get("vms/{vm_id}/terminals/{terminal_id}/logs") { _, ctx in
            let name = try Self.guestName(ctx, "terminal_id", what: "terminal")
            let out = try await terminalCall(ctx, name) { try await $0.terminalLines(name, lines: 1000) }
            return TerminalLogs(logs: out.map { TerminalLine(line: $0, timestamp: nil) })
        }
        v1.get("vms/{vm_id}/terminals/{terminal_id}/xterm-256color") { _, ctx in
            let name = try Self.guestName(ctx, "terminal_id", what: "terminal")
            let raw = try await terminalCall(ctx, name) { try await $0.terminalBytes(name) }
            return TerminalOutput(output: String(decoding: raw, as: UTF8.self))
        }
        v1.get("vms/{vm_id}/stats/stream") { req, ctx in
            let interval = min(max(try Self.intQuery(req, "interval_ms", range: 0...Int.max) ?? 1000, 100), 10_000)
            return try await ndjson(req, ctx, .stats(intervalMs: interval)) { event in
                guard case .stats(let s) = event else { return nil }
                return [
                    "timestamp": Date().ISO8601Format(), "memoryTotalBytes": s.memoryTotalBytes,
                    "memoryAvailableBytes": s.memoryAvailableBytes,
                    "memoryUsedBytes": s.memoryTotalBytes - min(s.memoryAvailableBytes, s.memoryTotalBytes),
                    "cpuPercent": Self.finite(s.cpuBusy * 100),
                    "cpus": s.cpus, "load1": Self.finite(s.load1), "uptimeSeconds": Self.finite(s.uptimeSeconds),
                ]
            }
        }
        v1.post("vms/{vm_id}/watch-files") { req, ctx in
            // collectBody (not body.collect): the stream below watches the rest of the request
            // for the client's close, which needs the body consumed this way.
            var req = req
            let body = try RequestBodies.decode(WatchFilesRequest.self, from: try await req.collectBody(upTo: 1 << 16))
            let (path, recursive) = (body.path ?? "/root", body.recursive ?? true)
            return try await ndjson(req, ctx, .watch(path: path, recursive: recursive)) { event in
                guard case .file(let p, let change, let dir) = event else { return nil }
                return ["path": p, "event": change, "isDirectory": dir, "timestamp": Date().ISO8601Format()]
            }
        }
        v1.post("vms/{vm_id}/resize") { req, ctx in
            let vm = try await ownedVM(ctx)
            let body = try RequestBodies.decode(ResizeVmRequest.self, from: try await req.body.collect(upTo: 1 << 16))
            let gb = body.rootfsSizeGb ?? 0  // validated: present, 1 to 16
            let r = try await engine.resizeDisk(vm, to: UInt64(gb) << 30)
            return ResizeResponse(
                id: vm.id, rootfsSizeGb: gb, message: "disk \(r.oldBytes >> 20) MiB → \(gb << 10) MiB; \(r.filesystem)")
        }
        v1.post("vms/{vm_id}/optimize") { _, ctx in
            let vm = try await ownedVM(ctx)
            let r = try await engine.optimize(vm)
            return OptimizeResponse(id: vm.id, message: r)
        }
    }

    /// JSONSerialization traps on NaN and infinities; the guest's figures are untrusted.
    static func finite(_ x: Double) -> Double { x.isFinite ? x : 0 }

    static func intQuery(_ req: Request, _ name: String, range: ClosedRange<Int>) throws -> Int? {
        guard let v = req.uri.queryParameters[Substring(name)] else { return nil }
        guard let n = Int(v), range.contains(n) else {
            throw APIError(
                .badRequest, "BAD_REQUEST", "\(name) must be an integer from \(range.lowerBound) to \(range.upperBound)"
            )
        }
        return n
    }

    /// A point in time given as ISO 8601 (`2026-11-24T15:00:00Z`, fractions and offsets
    /// allowed) or Unix seconds.
    /// - Throws: 400 naming `what`.
    static func time(_ s: String, what: String) throws -> Double {
        if let n = Double(s), n.isFinite, n >= 0 { return n }
        for style in [Date.ISO8601FormatStyle(includingFractionalSeconds: true), Date.ISO8601FormatStyle()] {
            if let d = try? style.parse(s) { return d.timeIntervalSince1970 }
        }
        throw APIError(
            .badRequest, "BAD_REQUEST",
            "\(what) must be ISO 8601 (2026-11-24T15:00:00Z) or Unix seconds, not '\(s.prefix(60))'")
    }

    /// A journal line as the agent returns it ("2026-11-24T15:00:00+0000 host unit[pid]: text"
    /// from journalctl -o short-iso, or plain text from the built-in supervisor).
    static func logItem(unit: String) -> (String) -> LogItem {
        { line in
            let parts = line.split(separator: " ", maxSplits: 1)
            if parts.count == 2, parts[0].count >= 19, parts[0].dropFirst(4).first == "-", parts[0].contains("T") {
                return LogItem(message: String(parts[1]), timestamp: String(parts[0]), priority: nil, unit: unit)
            }
            return LogItem(message: line, timestamp: "", priority: nil, unit: unit)
        }
    }

    func agent(_ ctx: APIContext) async throws -> Guest {
        try await engine.guest(try await ownedVM(ctx), wake: .resumeSuspended)
    }

    /// A service call where the guest's not_found is the API's SERVICE_NOT_FOUND.
    @discardableResult
    func serviceCall<T: Sendable>(_ ctx: APIContext, _ name: String, _ body: (Guest) async throws -> T) async throws
        -> T
    {
        let a = try await agent(ctx)
        do { return try await body(a) } catch let e as FurcateError where e.code == .notFound {
            throw APIError(
                .notFound, "SERVICE_NOT_FOUND", "no service \(name) (only services created through the API are managed)"
            )
        }
    }

    /// A terminal call where the guest's not_found is the API's TERMINAL_NOT_FOUND.
    func terminalCall<T: Sendable>(_ ctx: APIContext, _ name: String, _ body: (Guest) async throws -> T) async throws
        -> T
    {
        let a = try await agent(ctx)
        do { return try await body(a) } catch let e as FurcateError where e.code == .notFound {
            throw APIError(.notFound, "TERMINAL_NOT_FOUND", "no terminal \(name)")
        }
    }

    /// A streaming agent request as an NDJSON response: one JSON object per event, until the
    /// client goes away — noticed when its connection closes, not only at the next write, so a
    /// quiet watch ends too — or the guest's stream ends. The guest's stream is cancelled then.
    func ndjson(
        _ req: Request, _ ctx: APIContext, _ request: AgentRequest,
        _ line: @escaping @Sendable (AgentEvent) -> [String: any Sendable]?
    ) async throws -> Response {
        let stream = try await agent(ctx).stream(request)
        let items = stream.items
        var headers = HTTPFields()
        headers[.contentType] = "application/x-ndjson"
        headers[.cacheControl] = "no-store"
        return Response(
            status: .ok, headers: headers,
            body: ResponseBody { writer in
                var ended = false
                do {
                    try await req.body.consumeWithCancellationOnInboundClose { _ in
                        for try await item in items {
                            switch item {
                            case .event(let e):
                                guard let obj = line(e) else { continue }
                                var data = try JSONSerialization.data(withJSONObject: obj, options: [.sortedKeys])
                                data.append(0x0A)
                                try await writer.write(ByteBuffer(bytes: data))
                            case .end(let r):
                                ended = true
                                if case .error(let err) = r {
                                    let data = try JSONSerialization.data(withJSONObject: [
                                        "error": err.code.uppercased(), "message": err.message,
                                    ])
                                    try await writer.write(ByteBuffer(bytes: data + [0x0A]))
                                }
                                return
                            }
                        }
                    }
                } catch {
                    // The client went away (or the channel closed): end the guest's stream too.
                    if !ended { await stream.cancel() }
                    throw error
                }
                // Cancelled by the client's close (the stream just stops yielding) or ended.
                if !ended { await stream.cancel() }
                try await writer.finish(nil)
            })
    }
}
