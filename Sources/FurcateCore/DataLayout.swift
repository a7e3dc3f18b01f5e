import Foundation

/// Where `furcate serve` and every subcommand that takes `--data DIR` keep things:
///
///     DIR/store    the block store (VM disks and memory, image rootfs files, snapshots)
///     DIR/images   image blobs, scratch space, the image database
///     DIR/vms      the VM database, run directories (sockets, logs)
///     DIR/mnt      the store's FUSE mount
///     DIR/store.sock, DIR/store.log  the storage process's control socket and log
///     DIR/keys.sqlite  API keys (hashed)
///
/// The guest artifacts (kernel, initramfs, agent, the default image) are not data: they are
/// installed once, next to the executable (`PREFIX/share/furcate/guest` for
/// `PREFIX/bin/furcate`, as scripts/setup.sh installs them), and found whatever `--data` says.
public struct DataLayout: Sendable {
    /// The data directory (`--data`).
    public let root: String

    /// The layout under `root`; nil: `defaultRoot`.
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

    /// The block store's directory.
    public var store: String { root + "/store" }
    /// The image service's directory: downloaded blobs, scratch space, the image database.
    public var images: String { root + "/images" }
    /// VMService's data directory: its database and each VM's run directory (sockets, logs).
    public var vms: String { root + "/vms" }
    /// Where `serve` mounts the store.
    public var mountpoint: String { root + "/mnt" }
    /// Guest artifacts: `$FURCATE_GUEST_DIR` when set; else the installation's
    /// (`PREFIX/share/furcate/guest`) when it holds an agent; else DIR/guest (a build run from
    /// its checkout, or an older setup that put them there).
    public var guest: String {
        if let g = ProcessInfo.processInfo.environment["FURCATE_GUEST_DIR"], !g.isEmpty { return g }
        if let installed = Self.installedGuest(executable: Self.executable),
            FileManager.default.isReadableFile(atPath: installed + "/furcate-agent")
        {
            return installed
        }
        return root + "/guest"
    }

    /// The places `guest` looks, in its order, for messages that say where artifacts are missing.
    public var guestCandidates: [String] {
        var c: [String] = []
        if let g = ProcessInfo.processInfo.environment["FURCATE_GUEST_DIR"], !g.isEmpty { return [g] }
        if let installed = Self.installedGuest(executable: Self.executable) { c.append(installed) }
        return c + [root + "/guest"]
    }

    /// `PREFIX/share/furcate/guest` for an executable at `PREFIX/bin/NAME`; nil for one that is
    /// not in a `bin` directory (a build under `.build/`).
    public static func installedGuest(executable: String) -> String? {
        let bin = (executable as NSString).deletingLastPathComponent
        guard (bin as NSString).lastPathComponent == "bin" else { return nil }
        return (bin as NSString).deletingLastPathComponent + "/share/furcate/guest"
    }

    /// The storage process's control socket (`furcate store serve`).
    public var storeSocket: String { root + "/store.sock" }
    /// The storage process's log (its stdout and stderr).
    public var storeLog: String { root + "/store.log" }

    /// This process's executable, links resolved.
    public static var executable: String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
            ?? (CommandLine.arguments.first ?? "")
    }
    /// The static guest agent injected into images.
    public var agent: String { guest + "/furcate-agent" }
    /// The API key database.
    public var keys: String { root + "/keys.sqlite" }
}
