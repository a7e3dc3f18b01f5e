// What a VM's guest may reach, as the kernel firewall enforces it (the per-VM chain of the
// host's table, HostRules.swift).
import FurcateCore

/// Where a VM's connections may go. The host itself (loopback and every address of its own)
/// and other VMs are never reachable; the ranges of `IPv4Network.blockedByDefault` only when
/// `allowedNetworks` names them.
public struct EgressPolicy: Codable, Sendable, Equatable {
    /// Public addresses (everything not blocked by default) are reachable.
    public var allowPublic: Bool
    /// When set, public addresses are reachable on these TCP/UDP destination ports only.
    public var publicPorts: [UInt16]?
    /// Networks reachable on any port whatever the rest says, private ranges included.
    public var allowedNetworks: [IPv4Network]
    /// Names (each with the names under it) the guest's resolver answers whatever the rest
    /// says; the public addresses it answers with are then reachable on any port, until their
    /// answer expires (at least `DomainRule.minimumLifetime`). Private and reserved addresses
    /// stay blocked unless `allowedNetworks` names them: a name cannot open what an address
    /// could not. Lowercase, without a leading `*.`.
    public var allowedDomains: [String]

    /// A policy; the defaults let a guest reach the public internet and nothing private.
    public init(
        allowPublic: Bool = true, publicPorts: [UInt16]? = nil, allowedNetworks: [IPv4Network] = [],
        allowedDomains: [String] = []
    ) {
        self.allowPublic = allowPublic
        self.publicPorts = publicPorts
        self.allowedNetworks = allowedNetworks
        self.allowedDomains = allowedDomains
    }

    private enum CodingKeys: String, CodingKey { case allowPublic, publicPorts, allowedNetworks, allowedDomains }

    /// Decodes a policy; one recorded before domain allow-lists has none.
    public init(from decoder: any Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        allowPublic = try c.decode(Bool.self, forKey: .allowPublic)
        publicPorts = try c.decodeIfPresent([UInt16].self, forKey: .publicPorts)
        allowedNetworks = try c.decode([IPv4Network].self, forKey: .allowedNetworks)
        allowedDomains = try c.decodeIfPresent([String].self, forKey: .allowedDomains) ?? []
    }

    /// Whether the guest's resolver answers `name` (lowercase, no final dot): any name when
    /// public addresses are reachable, else those of `allowedDomains`.
    public func resolves(_ name: String) -> Bool { allowPublic || namesAllowed(name) }

    /// Whether `name` is one of `allowedDomains` or under one.
    public func namesAllowed(_ name: String) -> Bool {
        allowedDomains.contains { name == $0 || name.hasSuffix("." + $0) }
    }

    /// `domain` as a policy keeps it (lowercase, `*.` and a final dot dropped).
    /// - Throws: `.invalidArgument` for what is not a DNS name of two or more labels.
    public static func normalizedDomain(_ domain: String) throws -> String {
        var d = domain.lowercased()
        if d.hasPrefix("*.") { d.removeFirst(2) }
        if d.hasSuffix(".") { d.removeLast() }
        let labels = d.split(separator: ".", omittingEmptySubsequences: false)
        guard d.utf8.count <= 253, labels.count >= 2,
            labels.allSatisfy({ l in
                (1...63).contains(l.utf8.count) && l.first != "-" && l.last != "-"
                    && l.allSatisfy { $0.isASCII && ($0.isLetter || $0.isNumber || $0 == "-" || $0 == "_") }
            })
        else {
            throw FurcateError(
                .invalidArgument,
                "'\(domain.prefix(80))' is not a domain name (labels of letters, digits and hyphens joined by dots, optionally after *.)"
            )
        }
        return d
    }

    /// The public internet, nothing private.
    public static let allowPublicInternet = EgressPolicy()
    /// Nothing at all.
    public static let denyAll = EgressPolicy(allowPublic: false)

    /// Most networks a policy may name (each is one element of a kernel set).
    public static let maxNetworks = 256

    /// - Throws: `.invalidArgument` for port 0, an empty port list or too many networks.
    public func validate() throws {
        if let ports = publicPorts {
            guard !ports.isEmpty else {
                throw FurcateError(.invalidArgument, "publicPorts is empty: leave it out for any port, or deny public")
            }
            guard !ports.contains(0) else { throw FurcateError(.invalidArgument, "port 0 is not a destination port") }
        }
        guard allowedDomains.count <= Self.maxNetworks else {
            throw FurcateError(
                .invalidArgument, "a policy names at most \(Self.maxNetworks) domains, not \(allowedDomains.count)")
        }
        for d in allowedDomains where (try? Self.normalizedDomain(d)) != d {
            throw FurcateError(.invalidArgument, "'\(d.prefix(80))' is not a domain as a policy keeps it")
        }
        guard allowedNetworks.count <= Self.maxNetworks else {
            throw FurcateError(
                .invalidArgument,
                "a policy names at most \(Self.maxNetworks) networks, not \(allowedNetworks.count)")
        }
    }
}
