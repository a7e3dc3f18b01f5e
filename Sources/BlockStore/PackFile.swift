import CZlib
import FurcateCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Where a block's record lives: pack, byte offset of the record header, and the record's sizes.
public struct BlockLocation: Hashable, Sendable {
    /// The pack's id (its file name).
    public var pack: Int64
    /// Byte offset of the record header in the pack.
    public var offset: UInt64
    /// Payload bytes as stored.
    public var storedLength: UInt32
    /// Payload bytes uncompressed (the file's block size).
    public var rawLength: UInt32
    /// Algorithm tag of the payload (0 raw, 1 lz4, 2 zstd).
    public var codecTag: UInt8
}

/// The pack file format (version 1). All integers little-endian.
///
/// ```
/// pack header (32 bytes): "FURCPACK" | version u32 | reserved u32 | pack id u64 | reserved u32 | crc32 u32
/// record:  "FBLK" | codec u8 | flags u8 | reserved u16 | raw length u32 | stored length u32
///          | block id (32 bytes) | crc32 u32 over the 48 header bytes before it and the payload
///          | payload (stored length bytes)
/// ```
/// Packs are append-only. A record becomes reachable only once the index names it, which
/// happens after the pack was fsynced, so a torn tail left by a crash is never read.
enum PackFormat {
    static let magic: [UInt8] = Array("FURCPACK".utf8)
    static let version: UInt32 = 1
    static let headerSize = 32
    static let recordMagic: UInt32 = 0x4B4C_4246  // "FBLK" read little-endian
    static let recordHeaderSize = 52
    /// The largest raw block a record may claim; bounds what a reader allocates.
    static let maxRawLength = 1 << 20

    static func fileName(_ id: Int64) -> String {
        let digits = String(id)
        return String(repeating: "0", count: max(0, 12 - digits.count)) + digits + ".pack"
    }

    static func crc(_ p: UnsafeRawBufferPointer, _ seed: UInt = 0) -> UInt32 {
        UInt32(truncatingIfNeeded: crc32_z(seed, p.baseAddress?.assumingMemoryBound(to: UInt8.self), p.count))
    }

    static func header(packID: Int64) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: headerSize)
        h.replaceSubrange(0..<8, with: magic)
        h.withUnsafeMutableBytes { p in
            p.storeBytes(of: version.littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: UInt64(bitPattern: packID).littleEndian, toByteOffset: 16, as: UInt64.self)
            let c = crc(UnsafeRawBufferPointer(rebasing: p[0..<28]))
            p.storeBytes(of: c.littleEndian, toByteOffset: 28, as: UInt32.self)
        }
        return h
    }

    /// Checks a pack header; returns the pack id it names.
    static func checkHeader(_ h: UnsafeRawBufferPointer, path: String) throws -> Int64 {
        guard h.count >= headerSize, Array(h[0..<8]) == magic else {
            throw FurcateError(.damaged, "not a Furcate pack file (bad magic)", path: path, offset: 0)
        }
        let v = UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        guard v == version else {
            throw FurcateError(
                .unsupportedFormat, "pack format version \(v) is not supported (this build reads \(version))",
                path: path)
        }
        let c = UInt32(littleEndian: h.loadUnaligned(fromByteOffset: 28, as: UInt32.self))
        guard c == crc(UnsafeRawBufferPointer(rebasing: h[0..<28])) else {
            throw FurcateError(.damaged, "pack header checksum mismatch", path: path, offset: 0)
        }
        return Int64(bitPattern: UInt64(littleEndian: h.loadUnaligned(fromByteOffset: 16, as: UInt64.self)))
    }
}

/// One open pack file. Reference-counted so a reader keeps its descriptor valid while
/// compaction unlinks the file underneath it.
final class PackHandle: Sendable {
    let id: Int64
    let path: String
    let fd: Int32

    init(id: Int64, path: String, fd: Int32) {
        self.id = id
        self.path = path
        self.fd = fd
    }

    deinit { close(fd) }

    /// Reads the record at `loc`, checks its header and checksum, and decompresses it into `dst`
    /// (exactly `loc.rawLength` bytes). Returns the block id the record claims.
    /// - Throws: `.damaged` with path and offset when anything does not check out; `.io` on read errors.
    func readBlock(_ loc: BlockLocation, into dst: UnsafeMutableRawBufferPointer) throws -> BlockID {
        let total = PackFormat.recordHeaderSize + Int(loc.storedLength)
        let raw = UnsafeMutableRawBufferPointer.allocate(byteCount: total, alignment: 16)
        defer { raw.deallocate() }
        try preadFully(raw, at: loc.offset)
        let (claimed, payload) = try checkRecord(UnsafeRawBufferPointer(raw), at: loc.offset)
        guard Int(loc.rawLength) == dst.count,
            Codec.decompress(tag: loc.codecTag, payload, into: dst)
        else {
            throw FurcateError(
                .damaged, "block record does not decompress to \(dst.count) bytes", path: path, offset: loc.offset)
        }
        return claimed
    }

    /// Reads the raw bytes of a record (header and payload) without decompressing, for compaction.
    func readRecordBytes(_ loc: BlockLocation) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: PackFormat.recordHeaderSize + Int(loc.storedLength))
        try out.withUnsafeMutableBytes { buf in
            try preadFully(buf, at: loc.offset)
            _ = try checkRecord(UnsafeRawBufferPointer(buf), at: loc.offset)
        }
        return out
    }

    /// Validates a record held in `buf`; returns the id it claims and its payload.
    func checkRecord(_ buf: UnsafeRawBufferPointer, at offset: UInt64) throws -> (BlockID, UnsafeRawBufferPointer) {
        let h = PackFormat.recordHeaderSize
        guard buf.count >= h,
            UInt32(littleEndian: buf.loadUnaligned(as: UInt32.self)) == PackFormat.recordMagic
        else {
            throw FurcateError(.damaged, "bad block record magic", path: path, offset: offset)
        }
        let stored = Int(UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: 12, as: UInt32.self)))
        guard stored == buf.count - h else {
            throw FurcateError(.damaged, "block record length mismatch", path: path, offset: offset)
        }
        let want = UInt32(littleEndian: buf.loadUnaligned(fromByteOffset: 48, as: UInt32.self))
        var c = PackFormat.crc(UnsafeRawBufferPointer(rebasing: buf[0..<48]))
        c = PackFormat.crc(UnsafeRawBufferPointer(rebasing: buf[h...]), UInt(c))
        guard c == want else {
            throw FurcateError(.damaged, "block record checksum mismatch", path: path, offset: offset)
        }
        let id = BlockID(bytes: UnsafeRawBufferPointer(rebasing: buf[16..<48]))
        return (id, UnsafeRawBufferPointer(rebasing: buf[h...]))
    }

    func preadFully(_ buf: UnsafeMutableRawBufferPointer, at offset: UInt64) throws {
        var done = 0
        while done < buf.count {
            let n = try syscall("pread", path: path, offset: offset + UInt64(done)) {
                pread(fd, buf.baseAddress.map { $0 + done }, buf.count - done, off_t(offset) + off_t(done))
            }
            if n == 0 {
                throw FurcateError(.damaged, "block record runs past the end of the pack", path: path, offset: offset)
            }
            done += n
        }
    }
}

/// The store's pack files: one active pack taking appends, the rest sealed and read-only.
///
/// Appends are serialized by a mutex; reads go straight to a `PackHandle` with `pread`.
final class PackSet: Sendable {
    let directory: String
    /// A pack is sealed and a new one started once it reaches this size.
    let rolloverSize: UInt64

    private struct State {
        var handles: [Int64: PackHandle] = [:]
        var active: PackHandle?
        var activeEnd: UInt64 = 0
        var nextID: Int64
        /// Packs written since their last fdatasync.
        var unsynced: Set<Int64> = []
        var dirFsyncNeeded = false
    }
    private let state: Mutex<State>

    init(directory: String, nextID: Int64, rolloverSize: UInt64 = 256 << 20) {
        self.directory = directory
        self.rolloverSize = rolloverSize
        state = Mutex(State(nextID: nextID))
    }

    func path(of id: Int64) -> String { directory + "/" + PackFormat.fileName(id) }

    /// The handle of pack `id`, opening it on first use.
    /// - Throws: `.notFound` when the pack file is gone (compacted away meanwhile; the caller re-reads the index).
    func handle(_ id: Int64) throws -> PackHandle {
        try state.withLock { s in
            if let h = s.handles[id] { return h }
            let p = path(of: id)
            let fd = open(p, O_RDONLY | O_CLOEXEC)
            if fd < 0 {
                throw FurcateError.system("open", errno: errno, path: p)
            }
            let h = PackHandle(id: id, path: p, fd: fd)
            s.handles[id] = h
            return h
        }
    }

    /// Appends one block record and returns its location. Not durable until `sync()`.
    /// - Throws: `.diskFull` or `.io`; the pack's logical end does not move on failure.
    func append(id: BlockID, codecTag: UInt8, rawLength: Int, payload: UnsafeRawBufferPointer) throws -> BlockLocation {
        let h = PackFormat.recordHeaderSize
        var rec = [UInt8](repeating: 0, count: h + payload.count)
        rec.withUnsafeMutableBytes { p in
            p.storeBytes(of: PackFormat.recordMagic.littleEndian, toByteOffset: 0, as: UInt32.self)
            p[4] = codecTag
            p.storeBytes(of: UInt32(rawLength).littleEndian, toByteOffset: 8, as: UInt32.self)
            p.storeBytes(of: UInt32(payload.count).littleEndian, toByteOffset: 12, as: UInt32.self)
            if let base = p.baseAddress { id.write(to: base + 16) }  // h ≥ 48 bytes: never nil
            UnsafeMutableRawBufferPointer(rebasing: p[h...]).copyMemory(from: payload)
            var c = PackFormat.crc(UnsafeRawBufferPointer(rebasing: p[0..<48]))
            c = PackFormat.crc(UnsafeRawBufferPointer(rebasing: p[h...]), UInt(c))
            p.storeBytes(of: c.littleEndian, toByteOffset: 48, as: UInt32.self)
        }
        let loc = try appendRecord(rec, codecTag: codecTag, rawLength: UInt32(rawLength))
        return loc
    }

    /// Appends an already-encoded record (compaction copies records verbatim).
    func appendRecord(_ rec: [UInt8], codecTag: UInt8, rawLength: UInt32) throws -> BlockLocation {
        try state.withLock { s in
            if s.active == nil || s.activeEnd >= rolloverSize {
                try startPack(&s)
            }
            guard let pack = s.active else { throw FurcateError(.io, "no pack is open for writing") }
            let offset = s.activeEnd
            try rec.withUnsafeBytes { buf in
                var done = 0
                while done < buf.count {
                    let n = try syscall("pwrite", path: pack.path, offset: offset + UInt64(done)) {
                        pwrite(
                            pack.fd, buf.baseAddress.map { $0 + done }, buf.count - done, off_t(offset) + off_t(done))
                    }
                    done += n
                }
            }
            s.activeEnd += UInt64(rec.count)
            s.unsynced.insert(pack.id)
            return BlockLocation(
                pack: pack.id, offset: offset, storedLength: UInt32(rec.count - PackFormat.recordHeaderSize),
                rawLength: rawLength, codecTag: codecTag)
        }
    }

    /// Seals the active pack: later appends go to a new one, whose id is returned (every pack
    /// with a smaller id is sealed from now on).
    @discardableResult
    func seal() -> Int64 {
        state.withLock { s in
            s.active = nil
            return s.nextID
        }
    }

    private func startPack(_ s: inout State) throws {
        let id = s.nextID
        let p = path(of: id)
        // O_EXCL: a pack id is never reused, even after a crash left a file behind.
        let fd = try syscall("open", path: p) { open(p, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644) }
        let header = PackFormat.header(packID: id)
        do {
            let n = try header.withUnsafeBytes { b in
                try syscall("pwrite", path: p, offset: 0) { pwrite(fd, b.baseAddress, b.count, 0) }
            }
            if n != header.count { throw FurcateError(.io, "short write of pack header", path: p) }
        } catch {
            close(fd)
            unlink(p)
            throw error
        }
        s.nextID += 1
        let h = PackHandle(id: id, path: p, fd: fd)
        s.handles[id] = h
        s.active = h
        s.activeEnd = UInt64(PackFormat.headerSize)
        s.unsynced.insert(id)
        s.dirFsyncNeeded = true
    }

    /// Makes every append so far durable: fdatasync of each written pack, and of the directory
    /// when a pack was created (so its name survives a crash too).
    func sync() throws {
        let (toSync, dirNeeded) = state.withLock { s -> ([PackHandle], Bool) in
            let hs = s.unsynced.compactMap { s.handles[$0] }
            s.unsynced.removeAll()
            let d = s.dirFsyncNeeded
            s.dirFsyncNeeded = false
            return (hs, d)
        }
        do {
            for h in toSync {
                try syscall("fdatasync", path: h.path) { fdatasync(h.fd) }
            }
            if dirNeeded {
                let dfd = try syscall("open", path: directory) { open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC) }
                defer { close(dfd) }
                try syscall("fsync", path: directory) { fsync(dfd) }
            }
        } catch {
            // Put them back so the next sync tries again.
            state.withLock { s in
                for h in toSync { s.unsynced.insert(h.id) }
                if dirNeeded { s.dirFsyncNeeded = true }
            }
            throw error
        }
    }

    /// The pack ids present as files in the directory.
    func packIDsOnDisk() -> [Int64] {
        guard let d = opendir(directory) else { return [] }
        defer { closedir(d) }
        var ids: [Int64] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { raw in
                raw.baseAddress.map { String(cString: $0.assumingMemoryBound(to: CChar.self)) } ?? ""
            }
            if name.hasSuffix(".pack"), let id = Int64(name.dropLast(5)) { ids.append(id) }
        }
        return ids.sorted()
    }

    /// Size in bytes of pack `id` on disk, or nil when missing.
    func size(of id: Int64) -> UInt64? {
        var st = stat()
        guard stat(path(of: id), &st) == 0 else { return nil }
        return UInt64(st.st_size)
    }

    /// Forgets and deletes pack `id` (compaction); readers holding its handle finish unharmed.
    func remove(_ id: Int64) {
        state.withLock { s in
            s.handles[id] = nil
            s.unsynced.remove(id)
            if s.active?.id == id { s.active = nil }
        }
        unlink(path(of: id))
    }
}
