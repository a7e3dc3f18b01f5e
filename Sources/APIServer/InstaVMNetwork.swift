import FurcateCore
import FurcateEngine
import Hummingbird
import VMNetwork
import VMService

/// InstaVM's egress policies (`/v1/egress/vm/{id}`, `/v1/egress/session/{id}`, `egress_policy`
/// on a new VM) and shares (`/v1/shares`), as the official SDK sends them.
///
/// An egress body maps onto the kernel-enforced policy: `allow_http` and `allow_https` open the
/// public internet on port 80 and 443 (both: on every port), `allowed_cidrs` open those
/// networks on every port (private ranges included), `allowed_domains` (each with the names
/// under it; `*.` allowed) are resolved by the guest's resolver and the public addresses it
/// answers open on every port; nothing else is reachable (with neither http nor https, the
/// resolver answers allowed names only). `allow_public_repos` adds nothing beyond that yet: it
/// is reported as what the policy lets through.
extension InstaVMRoutes {
    /// The SDK's egress body.
    struct EgressRequest: JSONBody {
        static let fields: Set<String> = [
            "allow_public_repos", "allow_http", "allow_https", "allowed_domains", "allowed_cidrs",
        ]
        var allow_public_repos, allow_http, allow_https: Bool?
        var allowed_domains, allowed_cidrs: [String]?

        func validate() throws { _ = try policy }

        /// The policy the kernel enforces.
        var policy: EgressPolicy {
            get throws {
                var nets: [IPv4Network] = []
                for (i, c) in (allowed_cidrs ?? []).enumerated() {
                    guard c.utf8.count <= 64 else { throw FieldProblem(["allowed_cidrs", "\(i)"], .tooLong(max: 64)) }
                    do { nets.append(try IPv4Network(parsing: c)) } catch let e as FurcateError {
                        throw FieldProblem(["allowed_cidrs", "\(i)"], .invalid("allowed_cidrs.\(i): \(e.message)"))
                    }
                }
                guard nets.count <= EgressPolicy.maxNetworks else {
                    throw FieldProblem(
                        ["allowed_cidrs"], .invalid("allowed_cidrs names at most \(EgressPolicy.maxNetworks) networks"))
                }
                var names: [String] = []
                for (i, d) in (allowed_domains ?? []).enumerated() {
                    guard d.utf8.count <= 255 else {
                        throw FieldProblem(["allowed_domains", "\(i)"], .tooLong(max: 255))
                    }
                    do { names.append(try EgressPolicy.normalizedDomain(d)) } catch let e as FurcateError {
                        throw FieldProblem(["allowed_domains", "\(i)"], .invalid("allowed_domains.\(i): \(e.message)"))
                    }
                }
                guard names.count <= EgressPolicy.maxNetworks else {
                    throw FieldProblem(
                        ["allowed_domains"],
                        .invalid("allowed_domains names at most \(EgressPolicy.maxNetworks) domains"))
                }
                let (http, https) = (allow_http ?? true, allow_https ?? true)
                return EgressPolicy(
                    allowPublic: http || https, publicPorts: http == https ? nil : http ? [80] : [443],
                    allowedNetworks: nets, allowedDomains: Array(Set(names)).sorted())
            }
        }
    }

    /// What GET and POST answer: the policy in force, in the SDK's fields.
    struct EgressResponse: ResponseCodable {
        var vm_id, session_id, status: String
        var allow_public_repos, allow_http, allow_https: Bool
        var allowed_domains, allowed_cidrs: [String]

        init(vm: String, _ p: EgressPolicy) {
            vm_id = vm
            session_id = vm
            status = "active"
            allow_http = p.allowPublic && (p.publicPorts?.contains(80) ?? true)
            allow_https = p.allowPublic && (p.publicPorts?.contains(443) ?? true)
            allow_public_repos = allow_http && allow_https
            allowed_domains = p.allowedDomains
            allowed_cidrs = p.allowedNetworks.map(\.description)
        }
    }

    /// A share: a port of a VM reachable through the ingress.
    struct ShareResponse: ResponseCodable {
        var share_id, vm_id, session_id, url, status: String
        var port: Int
        var is_public: Bool

        init(_ e: Exposure, site: IngressSite?) {
            share_id = e.id
            vm_id = e.vmID
            session_id = e.vmID
            url = site?.url(vm: e.vmID, port: e.port) ?? ""
            status = "active"
            port = e.port
            is_public = e.isPublic
        }
    }

    /// `share` on a new VM, and the body of POST /v1/shares.
    struct ShareRequest: JSONBody {
        static let fields: Set<String> = ["port", "is_public", "vm_id", "session_id"]
        var port: Int
        var is_public: Bool?
        var vm_id, session_id: String?

        func validate() throws {
            try FieldProblem.check(port, "port", in: 1...65535)
            try FieldProblem.check(vm_id, "vm_id", max: 64)
            try FieldProblem.check(session_id, "session_id", max: 64)
        }
    }

    /// PATCH /v1/shares/{id}.
    struct ShareUpdate: JSONBody {
        static let fields: Set<String> = ["is_public", "revoke"]
        var is_public, revoke: Bool?

        func validate() throws {
            guard is_public != nil || revoke != nil else {
                throw FieldProblem([], .invalid("send is_public or revoke"))
            }
        }
    }

    func registerNetwork(on g: RouterGroup<APIContext>) {
        for kind in ["vm", "session"] {
            g.get("v1/egress/\(kind)/{id}") { _, ctx in
                let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
                return EgressResponse(vm: vm.id, engine.vms.egressPolicy(vm))
            }
            g.post("v1/egress/\(kind)/{id}") { req, ctx in
                let vm = try await ownedVM(try ctx.parameters.require("id"), ctx)
                let body = try RequestBodies.decode(EgressRequest.self, from: try await req.body.collect(upTo: 1 << 16))
                let n = try await engine.vms.setEgress(vm.id, try body.policy)
                return EgressResponse(vm: vm.id, engine.vms.egressPolicy(n))
            }
        }
        g.post("v1/shares") { req, ctx in
            let body = try RequestBodies.decode(ShareRequest.self, from: try await req.body.collect(upTo: 1 << 16))
            guard let id = body.vm_id ?? body.session_id else {
                throw InstaVMError.invalid(["body", "vm_id"], "name the VM to share: vm_id or session_id")
            }
            let vm = try await ownedVM(id, ctx)
            return ShareResponse(
                try share(vm, port: body.port, isPublic: body.is_public ?? false, ctx), site: engine.ingress)
        }
        g.patch("v1/shares/{id}") { req, ctx in
            // Another account's share is answered as a missing one, whatever the body.
            let id = try ctx.parameters.require("id")
            guard let e = engine.exposure(id, account: ctx.account) else {
                throw InstaVMError(status: .notFound, message: "Share not found: \(id.prefix(40))", items: nil)
            }
            let body = try RequestBodies.decode(ShareUpdate.self, from: try await req.body.collect(upTo: 1 << 16))
            var r = ShareResponse(
                try engine.updateExposure(e, isPublic: body.is_public, revoke: body.revoke ?? false),
                site: engine.ingress)
            if body.revoke == true { r.status = "revoked" }
            return r
        }
        g.get("v1/shares") { _, ctx in
            var out: [ShareResponse] = []
            for id in engine.owners.owned(by: ctx.account).keys {
                out += engine.exposures(of: id).map { ShareResponse($0, site: engine.ingress) }
            }
            return out.sorted { $0.share_id < $1.share_id }
        }
    }

    /// Exposes a port of the caller's VM; refused when nothing could reach it.
    func share(_ vm: VMInfo, port: Int, isPublic: Bool, _ ctx: APIContext) throws -> Exposure {
        try requireIngress()
        return try engine.expose(vm, port: port, isPublic: isPublic, account: ctx.account)
    }

    /// - Throws: 503 when nothing could reach a shared port (no ingress, or no VM networks).
    func requireIngress() throws {
        guard engine.ingress != nil, engine.vms.hasVMNetworks else {
            throw InstaVMError(
                status: .conflict,
                message:
                    "this server has no ingress for VM ports (furcate serve runs with --vm-network off or --ingress-port 0)",
                items: nil)
        }
    }
}
