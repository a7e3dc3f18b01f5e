import ArgumentParser
import BlockStore
import Foundation
import FurcateCore
import Images
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// `--data DIR`: the data directory, with the same default as `furcate serve`.
struct DataOption: ParsableArguments {
    @Option(name: .customLong("data"), help: "Data directory (default: $FURCATE_DATA, else ~/.local/share/furcate).")
    var data: String?

    var layout: DataLayout { DataLayout(data) }

    /// Opens (creating on first use) the data directory's store.
    func openOrCreateStore() throws -> BlockStore {
        let l = layout
        if FileManager.default.fileExists(atPath: l.store + "/index.sqlite") { return try openStore(l.store) }
        bootstrapOnce
        try FileManager.default.createDirectory(atPath: l.store, withIntermediateDirectories: true)
        return try BlockStore.create(at: l.store)
    }
}

struct ImageCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "image", abstract: "Pull OCI images into bootable rootfs files and list them.",
        subcommands: [Pull.self, List.self, Remove.self])

    struct Pull: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Pull an image (registry ref, oci:DIR[:TAG] or docker-archive:FILE) and build its rootfs.")
        @OptionGroup var data: DataOption
        @Argument(help: "Image reference, e.g. python:3.12-slim, localhost:5000/app:1, oci:./layout:v1.") var reference:
            String
        @Option(help: "Disk size in GB (default: content plus headroom, 3 to 16 GB).") var diskSizeGb: Int?
        @Option(help: "Registry user name (the password is read from $FURCATE_REGISTRY_PASSWORD).") var username:
            String?
        @Option(help: "Registry spoken to over plain HTTP (loopback registries always are); repeatable.")
        var insecureRegistry: [String] = []
        @Flag(help: "Print the image record as JSON.") var json = false

        func run() throws {
            bootstrapOnce
            if let g = diskSizeGb, !(1...16).contains(g) {
                throw ValidationError("--disk-size-gb must be 1 to 16, not \(g)")
            }
            do { _ = try ImageReference(parsing: reference) } catch let e as FurcateError {
                throw ValidationError(e.message)
            }
            var creds: RegistryCredentials?
            if let u = username {
                guard let p = ProcessInfo.processInfo.environment["FURCATE_REGISTRY_PASSWORD"] else {
                    throw ValidationError("--username needs the password in $FURCATE_REGISTRY_PASSWORD")
                }
                creds = RegistryCredentials(username: u, password: p)
            }
            let (data, reference, disk, insecure, json, credentials) = (
                data, reference, diskSizeGb, insecureRegistry, json, creds
            )
            try runBlocking {
                let store = try data.openOrCreateStore()
                defer { store.close() }
                let l = data.layout
                guard FileManager.default.isReadableFile(atPath: l.agent) else {
                    throw FurcateError(
                        .notFound,
                        "no guest agent at \(l.agent): run scripts/setup.sh (or scripts/build-agent.sh) first")
                }
                var o = ImageServiceOptions(directory: l.images, agentPath: l.agent)
                o.insecureRegistries = Set(insecure)
                let svc = try ImageService(store: store, options: o)
                let bar = ProgressPrinter()
                let r = try await svc.pull(
                    reference, credentials: credentials, diskBytes: disk.map { UInt64($0) << 30 }
                ) { bar.show($0) }
                if json { return try printJSON(r) }
                print("\(r.storeFile)  \(r.digest)  \(formatBytes(r.diskBytes)) disk  \(r.layers) layers")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List pulled images.")
        @OptionGroup var data: DataOption
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            let (data, json) = (data, json)
            try runBlocking {
                let store = try data.openOrCreateStore()
                defer { store.close() }
                let svc = try ImageService(
                    store: store, options: ImageServiceOptions(directory: data.layout.images, agentPath: nil))
                let all = await svc.list()
                if json { return try printJSON(all) }
                print(
                    "REFERENCE".padding(toLength: 48, withPad: " ", startingAt: 0)
                        + " DIGEST        DISK     CONTENT  STORE FILE")
                for r in all {
                    let ref = (r.references.last ?? "-").padding(toLength: 48, withPad: " ", startingAt: 0)
                    print(
                        "\(ref) \(r.digest.short)  \(formatBytes(r.diskBytes).padding(toLength: 8, withPad: " ", startingAt: 0)) \(formatBytes(r.contentBytes).padding(toLength: 8, withPad: " ", startingAt: 0)) \(r.storeFile)"
                    )
                }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Delete an image's rootfs (VMs made from it keep their disks).")
        @OptionGroup var data: DataOption
        @Argument(help: "Reference, digest (12+ hex digits) or store file name.") var image: String

        func run() throws {
            let (data, image) = (data, image)
            try runBlocking {
                let store = try data.openOrCreateStore()
                defer { store.close() }
                let svc = try ImageService(
                    store: store, options: ImageServiceOptions(directory: data.layout.images, agentPath: nil))
                try await svc.delete(image)
            }
        }
    }
}

func formatBytes(_ b: UInt64) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"]
    var v = Double(b)
    var i = 0
    while v >= 1000 && i < units.count - 1 {
        v /= 1000
        i += 1
    }
    return i == 0 ? "\(b) B" : String(format: "%.1f %@", v, units[i])
}

/// Pull progress on stderr: a bar per layer redrawn in place on a terminal, a line per phase
/// otherwise (logs, CI).
final class ProgressPrinter: Sendable {
    private struct State {
        var sizes: [Int64] = []
        var done: [UInt64] = []
        var lastDraw: UInt64 = 0
        var phase = ""
    }
    private let state = Mutex(State())
    private let tty = isatty(2) == 1

    func show(_ e: PullEvent) {
        state.withLock { s in
            switch e {
            case .resolved(let digest, let sizes):
                s.sizes = sizes
                s.done = Array(repeating: 0, count: sizes.count)
                line("resolved \(digest) (\(sizes.count) layers, \(formatBytes(UInt64(sizes.reduce(0, +)))))")
            case .layerProgress(let i, let bytes, _):
                guard i < s.done.count else { return }
                s.done[i] = bytes
                let now = DispatchTime.now().uptimeNanoseconds
                if tty && now - s.lastDraw > 100_000_000 {
                    s.lastDraw = now
                    draw(s)
                }
            case .layerCached(let i):
                if i < s.done.count { s.done[i] = UInt64(max(s.sizes[i], 0)) }
            case .unpacking(let i, let n):
                if tty && i == 0 { draw(s); FileHandleStderr.write("\n") }
                line("unpacking layer \(i + 1)/\(n)")
            case .buildingFilesystem(let disk, let content):
                line("building ext4: \(formatBytes(content)) of files on a \(formatBytes(disk)) disk")
            case .importing:
                line("writing the rootfs into the store")
            case .reused:
                line("already built for this digest")
            }
        }
    }

    private func draw(_ s: State) {
        let total = max(UInt64(s.sizes.reduce(0, +)), 1)
        let got = s.done.reduce(0, +)
        let width = 30
        let filled = Int(Double(width) * Double(min(got, total)) / Double(total))
        let bar = String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled)
        FileHandleStderr.write("\r[\(bar)] \(formatBytes(got)) / \(formatBytes(total))")
    }

    private func line(_ text: String) {
        FileHandleStderr.write(tty ? "\r\u{1b}[K\(text)\n" : "\(text)\n")
    }
}
