// The nftables rulesets of the VM networks, rendered from typed plans and policies.

/// Renders the host's table, the per-VM chains and the namespace's table.
enum HostRules {
    /// The host's table: no VM reaches the host itself or another VM (only answers to the
    /// host's own connections, the ingress's, come back); what a VM's connections
    /// may reach is its chain's verdict (jumped to through the `vms` map by its host link);
    /// everything from the pool leaving the host is masqueraded.
    static func baseTable(_ h: NetworkHost) -> String {
        let links = "\"\(h.linkPrefix)*\""
        return """
            table inet \(h.table) {
                map vms { type ifname : verdict; }
                chain input {
                    type filter hook input priority filter - 5; policy accept;
                    iifname \(links) ct state established,related accept
                    iifname \(links) drop
                }
                chain forward {
                    type filter hook forward priority filter - 5; policy accept;
                    oifname \(links) ct state established,related accept
                    oifname \(links) drop
                    iifname \(links) meta nfproto ipv6 drop
                    iifname \(links) iifname vmap @vms
                    iifname \(links) drop
                }
                chain postrouting {
                    type nat hook postrouting priority srcnat; policy accept;
                    ip saddr \(h.options.pool) oifname != \(links) masquerade
                }
            }

            """
    }

    /// A VM's chain, made with its rules.
    static func vmChain(_ p: VMNetworkPlan, policy: EgressPolicy, host h: NetworkHost) -> String {
        addNameSet(p, host: h) + "flush set inet \(h.table) \(p.nameSet)\n" + "add chain inet \(h.table) \(p.chain)\n"
            + vmRules(p, policy: policy, host: h)
    }

    /// The set of the addresses the guest's resolver answered for allowed names, each until its
    /// answer expires.
    static func addNameSet(_ p: VMNetworkPlan, host h: NetworkHost) -> String {
        "add set inet \(h.table) \(p.nameSet) { type ipv4_addr; flags timeout; }\n"
    }

    /// Adds resolved addresses to a VM's name set, or renews their time (an element added
    /// again keeps its old timeout: it is deleted and added in the same transaction).
    static func addResolved(_ p: VMNetworkPlan, _ addresses: [(IPv4Address, Int)], table: String) -> String {
        let set = "inet \(table) \(p.nameSet)"
        let all = addresses.map { "\($0.0)" }.joined(separator: ", ")
        return "add element \(set) { \(all) }\ndelete element \(set) { \(all) }\n"
            + "add element \(set) { \(addresses.map { "\($0.0) timeout \($0.1)s" }.joined(separator: ", ")) }\n"
    }

    /// The rules of a VM's chain: named networks first, then the default blocks, then the
    /// addresses of allowed names, then public addresses as the policy says; anything else is
    /// dropped.
    static func vmRules(_ p: VMNetworkPlan, policy: EgressPolicy, host h: NetworkHost) -> String {
        let at = "add rule inet \(h.table) \(p.chain)"
        var r = ""
        if !policy.allowedNetworks.isEmpty {
            r += "\(at) ip daddr { \(policy.allowedNetworks.map(\.description).joined(separator: ", ")) } accept\n"
        }
        r += "\(at) ip daddr { \(IPv4Network.blockedByDefault.map(\.description).joined(separator: ", ")) } drop\n"
        if !policy.allowedDomains.isEmpty { r += "\(at) ip daddr @\(p.nameSet) accept\n" }
        if policy.allowPublic {
            if let ports = policy.publicPorts {
                let list = Set(ports).sorted().map(String.init).joined(separator: ", ")
                r += "\(at) meta l4proto { tcp, udp } th dport { \(list) } accept\n"
            } else {
                r += "\(at) accept\n"
            }
        }
        r += "\(at) drop\n"
        return r
    }

    /// The map entry that sends a VM's traffic to its chain.
    static func vmJump(_ p: VMNetworkPlan, host h: NetworkHost) -> String {
        "add element inet \(h.table) vms { \"\(p.hostLink)\" : jump \(p.chain) }\n"
    }

    /// Removes a VM's map entry and chain (each only if there: a half-made VM network).
    static func removeVM(_ p: VMNetworkPlan, host h: NetworkHost) -> String {
        // `destroy` (nft ≥ 1.0.8) is not in Debian 12's nft; adding first makes deleting safe.
        """
        add chain inet \(h.table) \(p.chain)
        add element inet \(h.table) vms { "\(p.hostLink)" : jump \(p.chain) }
        delete element inet \(h.table) vms { "\(p.hostLink)" }
        delete chain inet \(h.table) \(p.chain)

        """ + addNameSet(p, host: h) + "delete set inet \(h.table) \(p.nameSet)\n"
    }

    /// The namespace's own table: the guest reaches its resolver and, through the uplink
    /// (masqueraded), what the host's chain for it allows; nothing else of the namespace. TCP
    /// connections the host makes to the namespace's address (the ingress) go on to the guest.
    static func namespaceTable() -> String {
        let tap = "\"\(GuestAddressing.tap)\"", up = "\"\(GuestAddressing.uplink)\""
        return """
            table ip furcate {
                chain input {
                    type filter hook input priority filter; policy drop;
                    iifname "lo" accept
                    ct state established,related accept
                    iifname \(tap) ip daddr \(GuestAddressing.resolver) meta l4proto { tcp, udp } th dport 53 accept
                }
                chain prerouting {
                    type nat hook prerouting priority dstnat; policy accept;
                    iifname \(up) meta l4proto tcp dnat to \(GuestAddressing.guest)
                }
                chain forward {
                    type filter hook forward priority filter; policy drop;
                    iifname \(tap) oifname \(up) accept
                    iifname \(up) oifname \(tap) ct state established,related accept
                    iifname \(up) oifname \(tap) ct status dnat accept
                }
                chain postrouting {
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname \(up) masquerade
                }
            }

            """
    }
}
