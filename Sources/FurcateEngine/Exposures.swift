// Exposed ports: what of a VM the ingress forwards to (Freestyle `ports`, InstaVM shares), and
// the ingress's router over them. A request's Host `{vm-id}-{port}.{public domain}` names a
// VM's exposed port (`{vm-id}.{public domain}` its first); a private one needs its owner's key.
import Accounts
import Foundation
import FurcateCore
import Ingress
import VMService

/// One port of one VM the ingress forwards to.
public struct Exposure: Codable, Sendable, Equatable {
    /// `sh-` and 20 lowercase alphanumerics (InstaVM's `share_id`).
    public var id: String
    /// The VM.
    public var vmID: String
    /// The guest's TCP port.
    public var port: Int
    /// Anyone may open it; otherwise only requests with a key of `account`.
    public var isPublic: Bool
    /// The VM's owner.
    public var account: String
    /// A host name of the owner's own that reaches this port (Freestyle `domains`); it stays
    /// with this VM (forks do not get it), and belongs to one VM of one account.
    public var domain: String?
    /// When it was made, Unix seconds.
    public var createdAt: Double
}

/// Where the ingress is reached: the names it gives VMs' ports.
public struct IngressSite: Sendable, Equatable {
    /// The domain VM host names end in (`localhost`: every browser and curl resolve
    /// `*.localhost` to this host without any DNS set-up).
    public var publicDomain: String
    /// The ingress's port as clients reach it.
    public var port: Int
    /// `http` or `https` (with a certificate).
    public var scheme: String

    /// A site; the domain is lowercased.
    public init(publicDomain: String, port: Int, scheme: String = "http") {
        self.publicDomain = publicDomain.lowercased()
        self.port = port
        self.scheme = scheme
    }

    /// The host name of a VM's port.
    public func host(vm: String, port guestPort: Int) -> String { "\(vm)-\(guestPort).\(publicDomain)" }

    /// The URL of a VM's port.
    public func url(vm: String, port guestPort: Int) -> String {
        let standard = (scheme == "http" && port == 80) || (scheme == "https" && port == 443)
        return "\(scheme)://\(host(vm: vm, port: guestPort))\(standard ? "" : ":\(port)")/"
    }

    /// Whether `host` (lowercase) is the public domain or under it: the names of VMs' ports.
    public func covers(_ host: String) -> Bool { host == publicDomain || host.hasSuffix("." + publicDomain) }

    /// The VM and port a host name names, if it is one of this site's.
    public func target(of host: String) -> (vm: String, port: Int?)? {
        guard host.hasSuffix("." + publicDomain) else { return nil }
        let label = host.dropLast(publicDomain.count + 1)
        guard !label.contains(".") else { return nil }
        let parts = label.split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count <= 2, (try? VMID.validateVM(String(parts[0]))) != nil else { return nil }
        guard parts.count == 2 else { return (String(parts[0]), nil) }
        guard let p = Int(parts[1]), parts[1].allSatisfy(\.isNumber), (1...65535).contains(p) else { return nil }
        return (String(parts[0]), p)
    }
}

extension Engine {
    /// Exposes a port of a VM through the ingress (the existing exposure of that port, its
    /// visibility set, when there is one), or with `domain` under a host name of its own.
    /// - Throws: `.invalidArgument` for a port outside 1-65535 or a malformed domain,
    ///   `.exists` for a domain another VM has.
    @discardableResult
    public func expose(_ vm: VMInfo, port: Int, isPublic: Bool, account: String, domain: String? = nil) throws
        -> Exposure
    {
        guard (1...65535).contains(port) else {
            throw FurcateError(.invalidArgument, "a port is 1 to 65535, not \(port)")
        }
        let domain = try domain.map { try checkCustomDomain($0, for: vm.id) }
        var e =
            exposures(of: vm.id).first { $0.port == port && $0.domain == domain }
            ?? Exposure(
                id: "sh-" + VMID.newVM(), vmID: vm.id, port: port, isPublic: isPublic, account: account,
                domain: domain, createdAt: Date().timeIntervalSince1970)
        e.isPublic = isPublic
        try owners.saveExposure(e)
        return e
    }

    /// `domain` lowercased, if a VM `vm` may have it: a DNS name that is neither under the
    /// ingress's public domain (whose names are the VMs' own: a custom domain there would take
    /// another VM's traffic) nor another VM's.
    /// - Throws: `.invalidArgument` for a malformed or reserved name, `.exists` for one taken.
    public func checkCustomDomain(_ domain: String, for vm: String?) throws -> String {
        let d = try Self.checkDomain(domain)
        if let site = ingress, site.covers(d) {
            throw FurcateError(
                .invalidArgument,
                "\(d) is under \(site.publicDomain), whose names the server gives VMs' ports: use a domain of your own")
        }
        if let other = owners.exposures().first(where: { $0.domain == d }), other.vmID != vm {
            throw FurcateError(.exists, "the domain \(d) belongs to another VM")
        }
        return d
    }

    /// `domain` lowercased, if it is a DNS name of two or more labels.
    /// - Throws: `.invalidArgument` saying what is wrong.
    public static func checkDomain(_ domain: String) throws -> String {
        let d = domain.lowercased()
        let labels = d.split(separator: ".", omittingEmptySubsequences: false)
        guard d.utf8.count <= 253, labels.count >= 2,
            labels.allSatisfy({ l in
                (1...63).contains(l.count) && l.first != "-" && l.last != "-"
                    && l.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-") }
            }),
            // A top-level label of digits only makes an address, not a name (RFC 3696 2).
            labels.last?.allSatisfy(\.isNumber) == false
        else {
            throw FurcateError(
                .invalidArgument,
                "'\(domain.prefix(80))' is not a domain name (labels of letters, digits and hyphens, joined by dots)")
        }
        return d
    }

    /// The host names that reach a VM's exposed ports: its custom domains, then
    /// `{vm-id}-{port}.{public domain}` for each port (none without an ingress).
    public func hostNames(of vm: String) -> [String] {
        let e = exposures(of: vm)
        guard let site = ingress else { return e.compactMap(\.domain) }
        return e.compactMap(\.domain) + Set(e.map(\.port)).sorted().map { site.host(vm: vm, port: $0) }
    }

    /// A VM's exposed ports, lowest port first.
    public func exposures(of vm: String) -> [Exposure] {
        owners.exposures().filter { $0.vmID == vm }.sorted { $0.port < $1.port }
    }

    /// The exposure `id` if `account` owns it.
    public func exposure(_ id: String, account: String) -> Exposure? {
        owners.exposures().first { $0.id == id && $0.account == account }
    }

    /// Changes an exposure's visibility, or with `revoke` removes it.
    public func updateExposure(_ e: Exposure, isPublic: Bool?, revoke: Bool) throws -> Exposure {
        if revoke {
            try owners.removeExposure(e.id)
            return e
        }
        var n = e
        if let isPublic { n.isPublic = isPublic }
        try owners.saveExposure(n)
        return n
    }

    /// Gives `forks` the exposed ports of `parent` (each its own URLs; custom domains stay
    /// with the parent).
    func copyExposures(from parent: String, to forks: [VMInfo], account: String) throws {
        for e in exposures(of: parent) where e.domain == nil {
            for f in forks { try expose(f, port: e.port, isPublic: e.isPublic, account: account) }
        }
    }

    /// Forgets a VM's exposed ports.
    func removeExposures(of vm: String) throws {
        for e in exposures(of: vm) { try owners.removeExposure(e.id) }
    }
}

/// The ingress's router: host name → exposed port of a VM → the address of its guest. A
/// suspended VM is resumed first; a private port needs a key of the VM's owner (sent as
/// `X-API-Key` or `Authorization: Bearer`, and never passed on to the guest).
public struct EngineIngressRouter: IngressRouter {
    let engine: Engine
    let site: IngressSite

    /// A router over `engine`'s exposures, for host names of `site`.
    public init(engine: Engine, site: IngressSite) {
        self.engine = engine
        self.site = site
    }

    /// Where `request` goes: its VM's exposed port, or a refusal saying why not.
    public func route(_ request: IngressRequest) async -> IngressRoute {
        // A name under the public domain is a VM's own, never a custom domain's.
        if !site.covers(request.host), let e = engine.owners.exposures().first(where: { $0.domain == request.host }) {
            return await route(request, to: e)
        }
        guard let (vmID, port) = site.target(of: request.host) else {
            return .refuse(
                status: 404, error: "NO_SUCH_HOST",
                message:
                    "'\(request.host.prefix(100))' names no VM: use {vm-id}-{port}.\(site.publicDomain) (or {vm-id}.\(site.publicDomain) for its first exposed port)"
            )
        }
        let exposed = engine.exposures(of: vmID)
        guard engine.owners.owner(vmID) != nil else {
            return .refuse(status: 404, error: "VM_NOT_FOUND", message: "no VM \(vmID)")
        }
        guard let e = port.map({ p in exposed.first { $0.port == p } }) ?? exposed.first else {
            let which = port.map { "port \($0)" } ?? "any port"
            return .refuse(
                status: 404, error: "PORT_NOT_EXPOSED",
                message:
                    "VM \(vmID) does not expose \(which) (exposed: \(exposed.map { String($0.port) }.joined(separator: ", ").nilIfEmpty ?? "none"))"
            )
        }
        return await route(request, to: e)
    }

    private func route(_ request: IngressRequest, to e: Exposure) async -> IngressRoute {
        let vmID = e.vmID
        guard let owner = engine.owners.owner(vmID), let vm = try? await engine.vms.info(vmID) else {
            return .refuse(status: 404, error: "VM_NOT_FOUND", message: "no VM \(vmID)")
        }
        var drop: [String] = []
        if !e.isPublic {
            guard let account = authenticatedAccount(request), account == owner else {
                return .refuse(
                    status: 401, error: "UNAUTHORIZED",
                    message: "port \(e.port) of VM \(vmID) is private: send its owner's API key as X-API-Key")
            }
            drop = ["x-api-key", "authorization"]
        }
        switch vm.state {
        case .running, .starting: break
        case .suspended:
            do { _ = try await engine.vms.resume(vmID) } catch {
                return .refuse(status: 502, error: "VM_NOT_RUNNING", message: "VM \(vmID) cannot be resumed: \(error)")
            }
        default:
            return .refuse(
                status: 502, error: "VM_NOT_RUNNING",
                message: "VM \(vmID) is \(vm.state.rawValue); start it to reach its ports")
        }
        guard let address = await engine.vms.guestAddress(vmID) else {
            return .refuse(
                status: 502, error: "NO_VM_NETWORK",
                message:
                    "VM \(vmID) has no network of its own (the server runs with --vm-network off), so nothing reaches its ports"
            )
        }
        await engine.policies.touch(vmID)
        return .forward(address: "\(address)", port: e.port, vm: vmID, dropHeaders: drop, closeAfter: !e.isPublic)
    }

    private func authenticatedAccount(_ r: IngressRequest) -> String? {
        var secret = r.header("x-api-key")
        if secret == nil, let a = r.header("authorization"), a.hasPrefix("Bearer ") { secret = String(a.dropFirst(7)) }
        guard let secret, let key = try? engine.keys.authenticate(secret) else { return nil }
        return key.account
    }
}

extension String {
    fileprivate var nilIfEmpty: String? { isEmpty ? nil : self }
}
