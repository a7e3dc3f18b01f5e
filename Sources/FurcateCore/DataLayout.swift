import Foundation

/// Where `furcate serve` and every subcommand that takes `--data DIR` keep things:
///
///     DIR/store    the block store (VM disks and memory, image rootfs files, snapshots)
///     DIR/images   image blobs, scratch space, the image database
///     DIR/vms      the VM database, run directories (sockets, logs)
///     DIR/mnt      the store's FUSE mount
///     DIR/guest    the guest kernel, initramfs and agent (scripts/guest-artifacts.sh)
///     DIR/keys.sqlite  API keys (hashed)
public struct DataLayout: Sendable {
    public let root: String

    public init(_ root: String? = nil) {
        self.root = root ?? Self.defaultRoot
    }

    /// `$FURCATE_DATA`, else `$XDG_DATA_HOME/furcate`, else `~/.local/share/furcate`.
    public static var defaultRoot: String {
        let env = ProcessInfo.processInfo.environment
        if let d = env["FURCATE_DATA"], !d.isEmpty { return d }
        if let x = env["XDG_DATA_HOME"], !x.isEmpty { return x + "/furcate" }
        return NSHomeDirectory() + "/.local/share/furcate"
    }

    public var store: String { root + "/store" }
    public var images: String { root + "/images" }
    public var vms: String { root + "/vms" }
    public var mountpoint: String { root + "/mnt" }
    /// Guest artifacts: `$FURCATE_GUEST_DIR` when set, else DIR/guest.
    public var guest: String {
        if let g = ProcessInfo.processInfo.environment["FURCATE_GUEST_DIR"], !g.isEmpty { return g }
        return root + "/guest"
    }
    public var agent: String { guest + "/furcate-agent" }
    public var keys: String { root + "/keys.sqlite" }
}
