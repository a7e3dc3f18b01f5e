import FurcateCore

/// One member of a tar archive, with pax and GNU long-name extensions folded in.
struct TarEntry {
    enum Kind: Equatable {
        case file, hardlink, symlink, charDevice, blockDevice, directory, fifo
    }
    var path: String
    var kind: Kind
    var size: Int64
    var mode: UInt32
    var uid: UInt32
    var gid: UInt32
    var mtime: Int64
    var linkName: String
    var devMajor: UInt32
    var devMinor: UInt32
    var xattrs: [(String, [UInt8])]
}

/// A streaming reader of ustar / pax / GNU tar (what image builders write). Entry data is read
/// through `readData` before the next `next()`; unread data is skipped.
final class TarReader {
    private let source: LayerReader
    private let what: String
    private var block = [UInt8](repeating: 0, count: 512)
    private var remaining: Int64 = 0  // data bytes of the current entry not yet read
    private var padding: Int64 = 0
    private(set) var offset: Int64 = 0

    init(_ source: LayerReader, what: String) {
        self.source = source
        self.what = what
    }

    private func readExactly(_ buf: UnsafeMutableRawBufferPointer) throws -> Bool {
        var got = 0
        while got < buf.count {
            let n = try source.read(into: UnsafeMutableRawBufferPointer(rebasing: buf[got...]))
            if n == 0 {
                if got == 0 { return false }
                throw damaged("ends in the middle of a record")
            }
            got += n
        }
        offset += Int64(buf.count)
        return true
    }

    private func damaged(_ why: String) -> FurcateError {
        FurcateError(.damaged, "\(what) is not a valid tar archive: \(why) (at byte \(offset))")
    }

    private func skip(_ n: Int64) throws {
        var left = n
        let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 16, alignment: 16)
        defer { buf.deallocate() }
        while left > 0 {
            let k = Int(min(left, Int64(buf.count)))
            guard try readExactly(UnsafeMutableRawBufferPointer(rebasing: buf[0..<k])) else {
                throw damaged("truncated entry data")
            }
            left -= Int64(k)
        }
    }

    /// Reads up to `buf.count` bytes of the current entry's data; 0 at its end.
    func readData(into buf: UnsafeMutableRawBufferPointer) throws -> Int {
        guard remaining > 0 else { return 0 }
        let k = Int(min(remaining, Int64(buf.count)))
        guard try readExactly(UnsafeMutableRawBufferPointer(rebasing: buf[0..<k])) else {
            throw damaged("truncated entry data")
        }
        remaining -= Int64(k)
        return k
    }

    /// Copies the rest of the current entry's data into `fd` (the file at `path`).
    func copyData(to fd: Int32, path: String, buffer: UnsafeMutableRawBufferPointer) throws {
        while true {
            let n = try readData(into: buffer)
            if n == 0 { return }
            try writeFully(fd, UnsafeRawBufferPointer(rebasing: buffer[0..<n]), path: path)
        }
    }

    private func readAllData(limit: Int64) throws -> [UInt8] {
        guard remaining <= limit else { throw damaged("an extended header of \(remaining) bytes (limit \(limit))") }
        var out = [UInt8](repeating: 0, count: Int(remaining))
        _ = try out.withUnsafeMutableBytes { try readExactly($0) }
        remaining = 0
        return out
    }

    /// The next entry, or nil at the end of the archive.
    func next() throws -> TarEntry? {
        try skip(remaining + padding)
        remaining = 0
        padding = 0
        var longName: String?
        var longLink: String?
        var pax: [String: [UInt8]] = [:]
        while true {
            let ok = try block.withUnsafeMutableBytes { try readExactly($0) }
            guard ok else { return nil }  // EOF without end marker: tolerated (many writers)
            if block.allSatisfy({ $0 == 0 }) { return nil }
            try verifyChecksum()
            let size = try number(124, 12)
            guard size >= 0 else { throw damaged("a negative size") }
            remaining = size
            padding = (512 - size % 512) % 512
            let type = block[156]
            switch type {
            case UInt8(ascii: "L"):
                longName = cString(try readAllData(limit: 1 << 20)[...])
                try skip(padding); padding = 0
                continue
            case UInt8(ascii: "K"):
                longLink = cString(try readAllData(limit: 1 << 20)[...])
                try skip(padding); padding = 0
                continue
            case UInt8(ascii: "x"):
                pax.merge(try parsePax(try readAllData(limit: 16 << 20))) { $1 }
                try skip(padding); padding = 0
                continue
            case UInt8(ascii: "g"):
                _ = try readAllData(limit: 16 << 20)  // global headers: nothing an image needs
                try skip(padding); padding = 0
                continue
            default:
                break
            }
            let kind: TarEntry.Kind
            switch type {
            case 0, UInt8(ascii: "0"), UInt8(ascii: "7"): kind = .file
            case UInt8(ascii: "1"): kind = .hardlink
            case UInt8(ascii: "2"): kind = .symlink
            case UInt8(ascii: "3"): kind = .charDevice
            case UInt8(ascii: "4"): kind = .blockDevice
            case UInt8(ascii: "5"): kind = .directory
            case UInt8(ascii: "6"): kind = .fifo
            default:
                throw FurcateError(
                    .unsupportedFormat,
                    "\(what) has a tar entry of type '\(Character(UnicodeScalar(type)))' (GNU sparse or unknown), which Furcate does not unpack"
                )
            }
            var name = cString(block[0..<100])
            let magic = Array(block[257..<263])
            if magic == Array("ustar\0".utf8) || magic == Array("ustar ".utf8) {
                let prefix = cString(block[345..<500])
                if magic == Array("ustar\0".utf8) && !prefix.isEmpty { name = prefix + "/" + name }
            }
            var e = TarEntry(
                path: longName ?? name, kind: kind, size: size,
                mode: UInt32(truncatingIfNeeded: try number(100, 8)) & 0o7777,
                uid: UInt32(truncatingIfNeeded: try number(108, 8)),
                gid: UInt32(truncatingIfNeeded: try number(116, 8)),
                mtime: try number(136, 12), linkName: longLink ?? cString(block[157..<257]),
                devMajor: UInt32(truncatingIfNeeded: try number(329, 8)),
                devMinor: UInt32(truncatingIfNeeded: try number(337, 8)),
                xattrs: [])
            for (k, v) in pax {
                let s = String(decoding: v, as: UTF8.self)
                switch k {
                case "path": e.path = s
                case "linkpath": e.linkName = s
                case "size":
                    guard let n = Int64(s), n >= 0 else { throw damaged("a pax size '\(s)'") }
                    e.size = n
                    remaining = n
                    padding = (512 - n % 512) % 512
                case "uid": e.uid = UInt32(s) ?? e.uid
                case "gid": e.gid = UInt32(s) ?? e.gid
                case "mtime": e.mtime = Int64(s.prefix { $0 != "." }) ?? e.mtime
                default:
                    if k.hasPrefix("SCHILY.xattr.") { e.xattrs.append((String(k.dropFirst(13)), v)) }
                }
            }
            if e.kind != .file { remaining = max(0, remaining) }
            if e.kind == .hardlink || e.kind == .symlink || e.kind == .directory { try skip(remaining); remaining = 0 }
            return e
        }
    }

    private func verifyChecksum() throws {
        var sum: Int64 = 0
        for (i, b) in block.enumerated() { sum += (148..<156).contains(i) ? 32 : Int64(b) }
        let stored = try number(148, 8)
        guard stored == sum else { throw damaged("a header checksum mismatch") }
    }

    /// A numeric field: octal text, or base-256 when the high bit of the first byte is set.
    private func number(_ off: Int, _ len: Int) throws -> Int64 {
        let f = block[off..<(off + len)]
        if let first = f.first, first & 0x80 != 0 {
            var v: Int64 = Int64(first & 0x7f)
            for b in f.dropFirst() {
                guard v < (Int64.max >> 8) else { throw damaged("a base-256 number too large") }
                v = v << 8 | Int64(b)
            }
            return v
        }
        var v: Int64 = 0
        var seen = false
        for b in f {
            if b == 0 || (b == 32 && seen) { break }
            if b == 32 { continue }
            guard (48...55).contains(b) else { throw damaged("a malformed number field") }
            seen = true
            v = v * 8 + Int64(b - 48)
            guard v < (Int64.max >> 3) else { throw damaged("a number too large") }
        }
        return v
    }

    private func cString(_ bytes: ArraySlice<UInt8>) -> String {
        String(decoding: bytes.prefix { $0 != 0 }, as: UTF8.self)
    }

    /// `LEN key=value\n` records.
    private func parsePax(_ data: [UInt8]) throws -> [String: [UInt8]] {
        var out: [String: [UInt8]] = [:]
        var i = 0
        while i < data.count {
            var len = 0
            var j = i
            while j < data.count, data[j] != 32 {
                guard (48...57).contains(data[j]), len < 1 << 24 else { throw damaged("a malformed pax record") }
                len = len * 10 + Int(data[j] - 48)
                j += 1
            }
            guard len > 0, i + len <= data.count, j < i + len, data[i + len - 1] == 10 else {
                throw damaged("a malformed pax record")
            }
            let rec = data[(j + 1)..<(i + len - 1)]
            guard let eq = rec.firstIndex(of: 61) else { throw damaged("a pax record without '='") }
            out[String(decoding: rec[rec.startIndex..<eq], as: UTF8.self)] = Array(rec[(eq + 1)...])
            i += len
        }
        return out
    }
}
