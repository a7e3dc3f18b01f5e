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

    /// A policy; the defaults let a guest reach the public internet and nothing private.
    public init(allowPublic: Bool = true, publicPorts: [UInt16]? = nil, allowedNetworks: [IPv4Network] = []) {
        self.allowPublic = allowPublic
        self.publicPorts = publicPorts
        self.allowedNetworks = allowedNetworks
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
        guard allowedNetworks.count <= Self.maxNetworks else {
            throw FurcateError(
                .invalidArgument,
                "a policy names at most \(Self.maxNetworks) networks, not \(allowedNetworks.count)")
        }
    }
}
