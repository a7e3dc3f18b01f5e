import ArgumentParser
import BlockStore
import Foundation
import FurcateCore
import Logging
import StoreServer

#if canImport(Glibc)
    import Glibc
#endif

struct StoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "store",
        abstract: "Create, fill, inspect and repair a block store.",
        subcommands: [
            Init.self, Put.self, Get.self, Clone.self, Snapshot.self, List.self, Remove.self, GC.self, Fsck.self,
            Stats.self, CrashWriter.self, Serve.self,
        ]
    )
}

struct StoreOptionsGroup: ParsableArguments {
    @Option(help: "Block size of new files: a power of two from 4K to 1M (default 64K, or the store's).")
    var blockSize: String?
    @Option(help: "Codec of new files: none, lz4, zstd or zstd:LEVEL (default: the store's).")
    var codec: String?

    func parsed() throws -> (Int?, Codec?) {
        var bs: Int?
        if let b = blockSize {
            let v = try ByteSize.parse(b)
            guard v <= UInt64(Int.max) else { throw FurcateError(.invalidArgument, "block size \(b) is too large") }
            bs = Int(v)
            try BlockStore.validateBlockSize(Int(v))
        }
        return (bs, try codec.map(Codec.init(parsing:)))
    }
}

/// Opens the store at `dir`, runs `body`, closes it; errors become one line on stderr.
func withStore(_ dir: String, _ body: (BlockStore) throws -> Void) throws {
    try reportingErrors {
        let store = try openStore(dir)
        defer { store.close() }
        try body(store)
    }
}

func openStore(_ dir: String) throws -> BlockStore {
    bootstrapOnce
    var o = StoreOptions()
    o.logger = Logger(label: "furcate.store")
    return try BlockStore.open(at: dir, options: o)
}

let bootstrapOnce: Void = bootstrapLogging()

func printJSON<T: Encodable>(_ value: T, snakeCase: Bool = false) throws {
    let enc = JSONEncoder()
    enc.outputFormatting = [.prettyPrinted, .sortedKeys]
    if snakeCase { enc.keyEncodingStrategy = .convertToSnakeCase }
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

extension StoreCommand {
    struct Init: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Create an empty store in DIR.")
        @Argument(help: "Store directory (created; must be empty).") var dir: String
        @OptionGroup var opts: StoreOptionsGroup

        func run() throws {
            try reportingErrors {
                bootstrapOnce
                let (bs, codec) = try opts.parsed()
                let s = try BlockStore.create(
                    at: dir, blockSize: bs ?? BlockStore.defaultBlockSize, codec: codec ?? .default)
                print(
                    "initialized store \(dir) (block size \(ByteSize.format(UInt64(s.defaultBlockSize))), codec \(s.defaultCodec))"
                )
                s.close()
            }
        }
    }

    struct Put: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Import a local file as NAME (holes stay holes).")
        @Argument var dir: String
        @Argument var name: String
        @Argument(help: "Local file to import.") var srcfile: String
        @OptionGroup var opts: StoreOptionsGroup

        func run() throws {
            try reportingErrors {
                let (bs, codec) = try opts.parsed()
                let fd = try syscall("open", path: srcfile) { open(srcfile, O_RDONLY | O_CLOEXEC) }
                defer { close(fd) }
                let store = try openStore(dir)
                defer { store.close() }
                let f = try store.createFile(name, blockSize: bs, codec: codec)
                do {
                    try FileTransfer.importFile(fd: fd, path: srcfile, into: f)
                } catch {
                    try? store.delete(name)  // no half-imported file left behind
                    throw error
                }
                print("\(name): \(ByteSize.format(f.size))")
            }
        }
    }

    struct Get: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Export NAME to a local file, sparse where NAME has holes.")
        @Argument var dir: String
        @Argument var name: String
        @Argument(help: "Local file to write (replaced if it exists).") var dstfile: String

        func run() throws {
            try withStore(dir) { store in
                let f = try store.file(name)
                let fd = try syscall("open", path: dstfile) {
                    open(dstfile, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                }
                defer { close(fd) }
                try FileTransfer.exportFile(f, fd: fd, path: dstfile)
            }
        }
    }

    struct Clone: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "O(1) copy-on-write clone; SRC is a file or a snapshot.")
        @Argument var dir: String
        @Argument var src: String
        @Argument var dst: String

        func run() throws {
            try withStore(dir) { store in
                try store.clone(src, to: dst)
            }
        }
    }

    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Immutable O(1) snapshot of a file.")
        @Argument var dir: String
        @Argument var name: String
        @Argument var snapname: String

        func run() throws {
            try withStore(dir) { store in
                try store.snapshot(name, as: snapname)
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List files and snapshots.")
        @Argument var dir: String
        @Flag var json = false

        func run() throws {
            try withStore(dir) { store in
                let items = try store.list()
                if json { return try printJSON(items) }
                for i in items {
                    let pad = String(repeating: " ", count: max(1, 10 - i.kind.name.count))
                    print(
                        "\(i.kind.name)\(pad)\(String(i.size).leftPad(16))  bs=\(ByteSize.format(UInt64(i.blockSize)))  \(i.codec)  \(i.name)"
                    )
                }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "rm", abstract: "Delete a file or snapshot (GC frees its blocks).")
        @Argument var dir: String
        @Argument var name: String

        func run() throws {
            try withStore(dir) { store in
                try store.delete(name)
            }
        }
    }

    struct GC: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "gc", abstract: "Free unreferenced blocks; compact sparse packs.")
        @Argument var dir: String
        @Flag var json = false

        func run() throws {
            try withStore(dir) { store in
                let r = try store.gc()
                if json { return try printJSON(r) }
                print(
                    "freed \(r.blocksFreed) blocks (\(ByteSize.format(r.bytesFreedInIndex)) raw) and \(r.nodesFreed) nodes; compacted \(r.packsCompacted) packs, deleted \(r.packsDeleted); reclaimed \(ByteSize.format(r.bytesReclaimedOnDisk)) on disk"
                )
            }
        }
    }

    struct Fsck: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Verify every reachable block; --repair quarantines damaged ones.",
            discussion:
                "A store that a storage process holds (furcate serve's, DATA/store) is checked by that process, its VMs running on."
        )
        @Argument(help: "Store directory (default: the data directory's store).") var dir: String?
        @OptionGroup var data: DataOption
        @Flag(help: "Move damaged blocks to quarantine.") var repair = false
        @Flag var json = false

        func run() throws {
            let dir = dir ?? data.layout.store
            try reportingErrors {
                let r: FsckReport
                do {
                    let store = try openStore(dir)
                    defer { store.close() }
                    r = try store.fsck(repair: repair)
                } catch let e as FurcateError where e.code == .busy {
                    // Held: by the storage process serving DIR/.. (DataLayout's store.sock), or by
                    // something else, which the store's own error names.
                    let root = ((dir as NSString).standardizingPath as NSString).deletingLastPathComponent
                    let socket = root + "/store.sock"
                    guard FileManager.default.fileExists(atPath: socket) else { throw e }
                    r = try StoreClient(socketPath: socket).fsck(repair: repair)
                }
                try report(r, dir: dir)
            }
        }

        private func report(_ r: FsckReport, dir: String) throws {
            if json {
                try printJSON(r)
            } else {
                print(
                    "checked \(r.files) files, \(r.nodesChecked) nodes, \(r.blocksChecked) blocks (\(ByteSize.format(r.bytesChecked)))"
                )
                for d in r.damage { print("damaged: \(d.file) offset \(d.offset): \(d.reason)") }
                for p in r.problems { print("problem: \(p)") }
                if r.quarantined > 0 { print("quarantined \(r.quarantined) blocks") }
                print(r.clean ? "clean" : "DAMAGED: \(r.damage.count) damaged extents, \(r.problems.count) problems")
            }
            if !r.clean {
                FileHandleStderr.write(
                    "furcate: store \(dir) is damaged: \(r.damage.count) damaged extents, \(r.problems.count) problems\n"
                )
                throw ExitCode(1)
            }
        }
    }

    struct Stats: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Logical and stored bytes, blocks, dedup and compression ratios.")
        @Argument var dir: String
        @Flag var json = false

        func run() throws {
            try withStore(dir) { store in
                let s = try store.stats()
                if json { return try printJSON(s) }
                print("files \(s.files), snapshots \(s.snapshots)")
                print("logical \(ByteSize.format(s.logicalBytes)), referenced \(ByteSize.format(s.referencedBytes))")
                print(
                    "blocks \(s.blocks), unique \(ByteSize.format(s.uniqueBytes)), stored \(ByteSize.format(s.storedBytes)) in \(s.packs) packs (\(ByteSize.format(s.packBytes)) on disk)"
                )
                print(String(format: "dedup %.2fx, compression %.2fx", s.dedupRatio, s.compressionRatio))
            }
        }
    }

    /// The writer child of the crash test: runs `CrashWorkload` and prints `synced N` after
    /// each durable sync point. Not for people; hidden from help.
    struct CrashWriter: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "crash-writer", shouldDisplay: false)
        @Argument var dir: String
        @Option var seed: UInt64
        @Option var ops: Int = 100_000

        func run() throws {
            try reportingErrors {
                let store = try openStore(dir)
                for f in CrashWorkload.files where try !store.exists(f) {
                    try store.createFile(f, blockSize: CrashWorkload.blockSize)
                }
                try store.syncAll()
                print("ready")
                fflush(nil)
                var w = CrashWorkload(seed: seed)
                for _ in 0..<ops {
                    switch w.next() {
                    case .write(let f, let off, let bytes): try store.file(f).write(bytes, at: off)
                    case .truncate(let f, let size): try store.file(f).truncate(to: size)
                    case .punch(let f, let off, let len): try store.file(f).punchHole(offset: off, length: len)
                    case .syncAll(let p):
                        try store.syncAll()
                        print("synced \(p)")
                        fflush(nil)
                    case .snapshot(let f, let name, let p):
                        try store.snapshot(f, as: name)
                        try store.syncAll()
                        print("synced \(p)")
                        fflush(nil)
                    }
                }
                store.close()
            }
        }
    }
}

extension String {
    func leftPad(_ n: Int) -> String { count >= n ? self : String(repeating: " ", count: n - count) + self }
}
