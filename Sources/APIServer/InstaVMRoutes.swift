import Builds
import Foundation
import FurcateCore
import FurcateEngine
import GuestAgentProtocol
import Hummingbird
import Images
import MultipartKit
import VMService

/// A FastAPI-style error: `{"detail": "…"}`, or for 422 `{"detail": [{"loc", "msg", "type"}]}`.
struct InstaVMError: HTTPResponseError {
    struct Item: Codable {
        var loc: [String]
        var msg, type: String
    }
    let status: HTTPResponse.Status
    let message: String
    let items: [Item]?
    var headers = HTTPFields()

    /// A validation error of one body field (422).
    static func invalid(_ loc: [String], _ msg: String, type: String = "value_error") -> InstaVMError {
        InstaVMError(status: .unprocessableContent, message: msg, items: [Item(loc: loc, msg: msg, type: type)])
    }

    func response(from request: Request, context: some RequestContext) throws -> Response {
        let body: Data
        if let items {
            body = try JSONEncoder().encode(["detail": items])
        } else {
            body = try JSONEncoder().encode(["detail": message])
        }
        var headers = headers
        headers[.contentType] = "application/json"
        return Response(status: status, headers: headers, body: .init(byteBuffer: ByteBuffer(bytes: body)))
    }

    /// The dialect's rendering of a Freestyle-shaped error (same status, `detail` text); the
    /// Freestyle dialect's 400 validation errors become 422s, its 400 VM_NOT_RUNNING a 409.
    static func from(_ e: APIError) -> InstaVMError {
        // A VM that is not running is a conflict with its state here (400 in Freestyle's document).
        if e.code == "VM_NOT_RUNNING" { return InstaVMError(status: .conflict, message: e.message, items: nil) }
        if e.status == .badRequest { return .invalid(["body"], e.message, type: e.code.lowercased()) }
        var r = InstaVMError(status: e.status, message: e.message, items: nil)
        r.headers = e.headers
        return r
    }
}

/// The InstaVM dialect under `/instavm` (seeds 000–002 and what the official `instavm` Python
/// SDK calls): sessions and execute/upload/download, snapshots built from OCI images, VMs.
/// A session is a VM: `session_id` and `vm_id` are the same id.
struct InstaVMRoutes: Sendable {
    let engine: Engine

    struct SnapshotInfo: ResponseCodable {
        var id, snapshot_id: String
        var name: String?
        var status: String
        var source_vm_id: String?
        var snapshot_type, type: String
        var oci_image: String?
        var vcpu_count, memory_mb: Int?
        var size_bytes: Int
        var is_public: Bool
        var last_error: String?
        var created_at, updated_at: String
        // hypeman's fields (seed 003).
        var compression_state: String?
        var compressed_size_bytes, uncompressed_size_bytes: UInt64?
    }
    struct VMCreateResponse: ResponseCodable {
        var vm_id: String?
        var session_id, status: String
        var share: ShareResponse?
        var custom_domain: [String: String]?
        var env_status: String
        var env_error: String?
    }
    struct VMRecord: ResponseCodable {
        var vm_id, session_id, status, created_at: String
        var snapshot_id: String?
        var memory_mb, vcpu_count: Int
        var expires_at: String?
        /// Furcate's: why a failed (lost) VM failed, and what was kept.
        var last_error: String?
    }
    struct StatusResponse: ResponseCodable { var status, vm_id: String }
    struct UploadResponse: ResponseCodable {
        var status, remote_path: String
        var size: Int
    }
    struct DownloadResponse: ResponseCodable {
        var status, filename, content: String
        var size: Int
    }
    struct ExecuteResponse: ResponseCodable {
        var stdout, stderr: String
        var exit_code: Int
        var execution_time: Double
        var session_id, status: String
    }

    func register(on g: RouterGroup<APIContext>) {
        g.post("v1/sessions/session") { req, ctx in try await startSession(req, ctx) }
        g.post("execute") { req, ctx in try await execute(req, ctx) }
        g.post("upload") { req, ctx in try await upload(req, ctx) }
        g.post("download") { req, ctx in try await download(req, ctx) }
        g.post("kill") { req, ctx in
            let body = try RequestBodies.decode(SessionRequest.self, from: try await req.body.collect(upTo: 1 << 16))
            let vm = try await ownedVM(body.session_id, ctx)
            try await deleteVM(vm.id)
            return StatusResponse(status: "deleted", vm_id: vm.id)
        }
        registerNetwork(on: g)
        g.post("v1/snapshots") { req, ctx in try await createSnapshot(req, ctx) }
        g.get("v1/snapshots") { req, ctx in
            let type = req.uri.queryParameters["type"].map(String.init)
            if let type, type != "user", type != "system" {
                throw InstaVMError.invalid(["query", "type"], "type must be user or system")
            }
            var out: [SnapshotInfo] = []
            for s in try engine.snapshots(of: ctx.account)
            where !s.deleted && (type == nil || (s.kind ?? .user).rawValue == type) {
                out.append(await info(await engine.resolve(s)))
            }
            return out
        }
        g.get("v1/snapshots/{id}") { _, ctx in await info(try await ownedSnapshot(ctx)) }
        g.delete("v1/snapshots/{id}") { _, ctx in
            let s = try await ownedSnapshot(ctx)
            try await engine.deleteSnapshot(s.record)
            return StatusResponse(status: "deleted", vm_id: s.record.id)
        }
        g.post("v1/vms") { req, ctx in try await createVM(req, ctx) }
        // `GET /v1/vms/` (the SDK's list_all_records) reaches this route too: the router ignores a trailing slash.
        g.get("v1/vms") { _, ctx in try await listVMs(ctx) }
        g.get("v1/vms/{id}") { _, ctx in await record(try await ownedVM(try ctx.parameters.require("id"), ctx)) }
        g.delete("v1/vms/{id}") { _, ctx in
            let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
            try await deleteVM(vm.id)
            return StatusResponse(status: "deleted", vm_id: vm.id)
        }
        g.post("v1/vms/{id}/snapshot") { req, ctx in
            let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
            let body = try RequestBodies.decode(SnapshotVMRequest.self, from: try await req.body.collect(upTo: 1 << 16))
            let s = try await engine.snapshot(
                vm, account: ctx.account, name: body.name, persistence: .persistent, kind: .user)
            return await info(await engine.resolve(s))
        }
        g.post("v1/vms/{id}/clone") { req, ctx in
            let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
            let body = try RequestBodies.decode(CloneVMRequest.self, from: try await req.body.collect(upTo: 1 << 16))
            let r = try await engine.fork(
                vm, account: ctx.account, count: 1, snapshotName: body.snapshot_name, snapshotKind: .user)
            let clone = r.forks[0]
            return VMCreateResponse(
                vm_id: clone.id, session_id: clone.id, status: Self.status(clone.state), env_status: "none")
        }
        g.post("v1/vms/{id}/suspend") { _, ctx in
            let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
            let s = try await engine.suspend(vm)
            return StatusResponse(status: Self.status(s.state), vm_id: vm.id)
        }
        g.post("v1/vms/{id}/resume") { _, ctx in
            let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
            // A suspended VM resumes; a stopped or failed (lost) one boots again from its disk.
            guard vm.state != .running else {
                throw InstaVMError(status: .conflict, message: "VM \(vm.id) is running, not suspended", items: nil)
            }
            let r = try await engine.start(vm)
            return StatusResponse(status: Self.status(r.state), vm_id: vm.id)
        }
    }

    // MARK: request helpers

    static func wait(_ req: Request) throws -> Bool {
        switch req.uri.queryParameters["wait"].map({ $0.lowercased() }) {
        case nil, "true", "1": return true
        case "false", "0": return false
        default: throw InstaVMError.invalid(["query", "wait"], "Input should be a valid boolean", type: "bool_parsing")
        }
    }

    static func status(_ s: VMState) -> String {
        switch s {
        case .building, .starting: return "creating"
        case .running: return "running"
        case .suspending, .suspended: return "suspended"
        case .stopped: return "stopped"
        case .lost: return "failed"
        }
    }

    func ownedVM(_ id: String, _ ctx: APIContext) async throws -> VMInfo {
        guard let vm = try await engine.ownedVM(id, account: ctx.account) else {
            throw InstaVMError(status: .notFound, message: "VM not found: \(id.prefix(40))", items: nil)
        }
        return vm
    }

    func ownedSnapshot(_ ctx: APIContext) async throws -> ResolvedSnapshot {
        let id = try ctx.parameters.require("id")
        guard let s = try await engine.ownedSnapshot(id, account: ctx.account) else {
            throw InstaVMError(status: .notFound, message: "Snapshot not found: \(id.prefix(64))", items: nil)
        }
        return s
    }

    func deleteVM(_ id: String) async throws {
        try await engine.forgetVM(id)
    }

    func record(_ vm: VMInfo) async -> VMRecord {
        VMRecord(
            vm_id: vm.id, session_id: vm.id, status: Self.status(vm.state),
            created_at: FreestyleRoutes.iso(vm.createdAt),
            snapshot_id: vm.parentSnapshot, memory_mb: vm.memoryMiB, vcpu_count: vm.vcpus,
            expires_at: (try? await engine.policies.policy(vm.id))??.expiresAt.map(FreestyleRoutes.iso),
            last_error: vm.lostReason)
    }

    func listVMs(_ ctx: APIContext) async throws -> [VMRecord] {
        var out: [VMRecord] = []
        for o in try await engine.vms(of: ctx.account) { out.append(await record(o.vm)) }
        return out
    }

    func info(_ r: ResolvedSnapshot) async -> SnapshotInfo {
        let s = r.record
        let status: String
        switch r.state {
        case .building: status = "building"
        case .ready: status = "ready"
        case .failed, .cancelled, .lost: status = "failed"
        }
        let size = await engine.storedBytes(r)
        return SnapshotInfo(
            id: s.id, snapshot_id: s.id, name: s.name, status: status, source_vm_id: s.sourceVmId,
            snapshot_type: s.ociImage != nil ? "oci" : "vm",
            type: (s.kind ?? .user).rawValue, oci_image: s.ociImage, vcpu_count: r.info?.vcpus ?? s.vcpus,
            memory_mb: r.info?.memoryMiB ?? s.memoryMiB,
            size_bytes: Int(size), is_public: false, last_error: r.state == .ready ? nil : r.failureReason,
            created_at: FreestyleRoutes.iso(s.createdAt),
            updated_at: FreestyleRoutes.iso(r.build?.updatedAt ?? s.updatedAt),
            compression_state: r.info?.compressionState?.rawValue, compressed_size_bytes: r.info?.compressedSizeBytes,
            uncompressed_size_bytes: r.info?.uncompressedSizeBytes)
    }

    // MARK: snapshots

    func createSnapshot(_ req: Request, _ ctx: APIContext) async throws -> EditedResponse<SnapshotInfo> {
        let body = try RequestBodies.decode(CreateSnapshotRequest.self, from: try await req.body.collect(upTo: 1 << 20))
        let recipe = (body.build_args?.args ?? InstaVMBuildArgs()).recipe(
            image: body.oci_image, vcpus: body.vcpu_count ?? 2, memoryMiB: body.memory_mb ?? 512)
        do {
            let s = try await engine.startSnapshotBuild(recipe, account: ctx.account) {
                $0.name = body.name
                $0.ociImage = body.oci_image
                $0.kind = body.type ?? .user
            }
            return EditedResponse(status: .created, response: await info(await engine.resolve(s)))
        } catch let e as FurcateError where e.code == .invalidArgument {
            throw InstaVMError.invalid(["body"], e.message)
        }
    }

    // MARK: VMs and sessions

    /// Creates a VM for the caller from `snapshot_id` or the default image; `env` is added to
    /// the guest's environment; the VM is deleted when its lifetime ends.
    /// A restore takes about a second, so `wait=false` is answered after it too (with the id):
    /// callers validate `wait` and call this either way.
    func newVM(_ new: NewVMRequest, _ ctx: APIContext) async throws -> VMCreateResponse {
        let (lifetime, memory, vcpus, env, sid) = (
            new.vm_lifetime_seconds, new.memory_mb, new.vcpu_count, new.env, new.snapshot_id
        )
        let target: String
        do {
            target = try await engine.bootable(sid.map { .snapshot($0) } ?? .defaultImage, account: ctx.account)
        } catch let e as FurcateError where e.code == .notFound {
            throw InstaVMError(status: .notFound, message: "Snapshot not found: \(sid?.prefix(64) ?? "")", items: nil)
        } catch let e as FurcateError where e.code == .invalidState {
            throw InstaVMError(status: .conflict, message: e.message, items: nil)
        }
        let snap = try await engine.machine(of: target)
        if let memory, memory != snap.memoryMiB {
            throw InstaVMError.invalid(
                ["body", "memory_mb"],
                "a VM restored from this snapshot has its \(snap.memoryMiB) MB; create a snapshot with memory_mb=\(memory) first"
            )
        }
        if let vcpus, vcpus != snap.vcpus {
            throw InstaVMError.invalid(
                ["body", "vcpu_count"],
                "a VM restored from this snapshot has its \(snap.vcpus) vCPUs; create a snapshot with vcpu_count=\(vcpus) first"
            )
        }
        let policy = VMPolicy(
            persistence: .persistent, expiresAt: lifetime.map { Date().timeIntervalSince1970 + Double($0) })
        if new.share != nil { try requireIngress() }
        var made = NewVM(account: ctx.account, snapshot: target, policy: policy, environment: env)
        made.machine.egress = try new.egress_policy?.policy
        if let s = new.share { made.exposedPorts = [ExposedPort(port: s.port, isPublic: s.is_public ?? false)] }
        let vm = try await engine.createVM(made)
        return VMCreateResponse(
            vm_id: vm.id, session_id: vm.id, status: Self.status(vm.state),
            share: engine.exposures(of: vm.id).first.map { ShareResponse($0, site: engine.ingress) },
            env_status: env == nil ? "none" : "applied")
    }

    func createVM(_ req: Request, _ ctx: APIContext) async throws -> VMCreateResponse {
        let body = try RequestBodies.decode(CreateVMRequest.self, from: try await req.body.collect(upTo: 1 << 20))
        _ = try Self.wait(req)  // validated; see newVM
        return try await newVM(body.vm, ctx)
    }

    func startSession(_ req: Request, _ ctx: APIContext) async throws -> VMCreateResponse {
        let body = try RequestBodies.decode(StartSessionRequest.self, from: try await req.body.collect(upTo: 1 << 20))
        // The SDK sends its key in the body here, not in a header.
        var ctx = ctx
        if ctx.key == nil {
            guard let secret = body.own.api_key, let key = try engine.keys.authenticate(secret) else {
                throw InstaVMError(status: .unauthorized, message: "Invalid API key", items: nil)
            }
            ctx.key = key
        }
        return try await newVM(body.vm, ctx)
    }

    func execute(_ req: Request, _ ctx: APIContext) async throws -> ExecuteResponse {
        let body = try RequestBodies.decode(ExecuteRequest.self, from: try await req.body.collect(upTo: 8 << 20))
        let vm = try await ownedVM(body.session_id, ctx)
        let r = try await engine.guest(vm, wake: .requireRunning).exec(
            ExecRequest(argv: try body.argv, timeoutMs: (body.timeout ?? 300) * 1000))
        return ExecuteResponse(
            stdout: String(decoding: r.stdout, as: UTF8.self), stderr: String(decoding: r.stderr, as: UTF8.self),
            exit_code: r.timedOut ? 124 : Int(r.exitCode ?? (128 + (r.signal ?? 9))),
            execution_time: Double(r.durationMs) / 1000, session_id: vm.id,
            status: r.timedOut ? "timeout" : "success")
    }

    /// Whether every header name in the parts of a multipart body is ASCII. MultipartKit 4.7
    /// traps on a header name byte of 0x80 or more (it indexes a 128-entry table with it):
    /// found by schemathesis, one such request ended the whole server. A part's headers run
    /// from its delimiter line to the first empty line; a header's name is its line up to the
    /// first `:` (all of it when there is none). Stricter than the parser, never laxer.
    static func headerNamesAreASCII(_ body: ByteBuffer, boundary: String) -> Bool {
        let bytes = body.readableBytesView  // an upload may be 256 MiB: scanned in place, not copied
        let delimiter = Array(("--" + boundary).utf8)
        guard !boundary.isEmpty else { return !bytes.contains { $0 >= 0x80 } }
        var i = bytes.startIndex
        while let d = bytes[i...].firstRange(of: delimiter) {
            i = d.upperBound
            let end = bytes[i...].firstRange(of: Array("\r\n\r\n".utf8))?.lowerBound ?? bytes.endIndex
            let next = bytes[i...].firstRange(of: delimiter)?.lowerBound ?? bytes.endIndex
            for line in bytes[i..<min(end, next)].split(separator: 0x0A) {
                if line.prefix(while: { $0 != UInt8(ascii: ":") }).contains(where: { $0 >= 0x80 }) { return false }
            }
        }
        return true
    }

    /// A guest path from a form: absolute, without `..` or NUL.
    static func guestPath(_ s: String, field: String) throws -> String {
        guard s.hasPrefix("/"), !s.split(separator: "/").contains(".."), !s.contains("\0"), s.utf8.count <= 4096 else {
            throw InstaVMError.invalid(["body", field], "the path must be absolute, without '..'")
        }
        return s
    }

    func upload(_ req: Request, _ ctx: APIContext) async throws -> UploadResponse {
        struct Form: Decodable {
            var file: Data
            var remote_path, session_id: String
            var recursive: String?
        }
        guard let type = req.headers[.contentType], type.lowercased().hasPrefix("multipart/form-data"),
            let boundary = type.split(separator: ";").map({ $0.trimmingCharacters(in: .whitespaces) }).first(where: {
                $0.hasPrefix("boundary=")
            })?.dropFirst(9)
        else {
            throw InstaVMError.invalid(["body"], "send the file as multipart/form-data (file, remote_path, session_id)")
        }
        let body = try await req.body.collect(upTo: 256 << 20)
        let boundaryText = String(boundary.trimmingCharacters(in: CharacterSet(charactersIn: "\"")))
        guard Self.headerNamesAreASCII(body, boundary: boundaryText) else {
            throw InstaVMError.invalid(["body"], "a part's header name is not ASCII (a malformed multipart form)")
        }
        let form: Form
        do {
            form = try FormDataDecoder().decode(
                Form.self, from: body,
                boundary: String(boundary.trimmingCharacters(in: CharacterSet(charactersIn: "\""))))
        } catch {
            throw InstaVMError.invalid(["body"], "the form needs file, remote_path and session_id: \(error)")
        }
        guard form.recursive == nil || form.recursive == "false" else {
            throw InstaVMError.invalid(
                ["body", "recursive"], "recursive uploads are not supported; upload files one at a time",
                type: "unsupported")
        }
        let path = try Self.guestPath(form.remote_path, field: "remote_path")
        let vm = try await ownedVM(form.session_id, ctx)
        let data = form.file
        try await engine.writeFile(vm, path, data, wake: .requireRunning)
        return UploadResponse(status: "success", remote_path: path, size: data.count)
    }

    func download(_ req: Request, _ ctx: APIContext) async throws -> DownloadResponse {
        struct Form: Decodable { var filename, session_id: String }
        let body = try await req.body.collect(upTo: 1 << 16)
        let form: Form
        do { form = try URLEncodedFormDecoder().decode(Form.self, from: String(buffer: body)) } catch {
            throw InstaVMError.invalid(["body"], "send filename and session_id as a form")
        }
        let path = try Self.guestPath(form.filename, field: "filename")
        let vm = try await ownedVM(form.session_id, ctx)
        let found: GuestFile
        do { found = try await engine.readFile(vm, path, wake: .requireRunning) } catch let e as FurcateError
            where e.code == .notFound
        {
            throw InstaVMError(status: .notFound, message: "File not found: \(path)", items: nil)
        } catch let e as FurcateError where e.code == .tooLarge {
            throw InstaVMError(status: .contentTooLarge, message: e.message, items: nil)
        }
        guard case .file(let data) = found else {
            throw InstaVMError(status: .badRequest, message: "\(path) is not a regular file", items: nil)
        }
        return DownloadResponse(
            status: "success", filename: path, content: data.base64EncodedString(), size: data.count)
    }
}
