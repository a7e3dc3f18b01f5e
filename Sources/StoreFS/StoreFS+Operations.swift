import BlockStore
import CFuse
import Foundation
import FurcateCore

#if canImport(Glibc)
    import Glibc
#endif

// The request handlers. libfuse calls them on its worker threads with the server as userdata.
// They are C function pointers (no captures), built outside main.swift so they are not
// main-actor isolated.

@inline(__always)
private func server(_ req: fuse_req_t?) -> StoreFS {
    // SAFETY: userdata is the StoreFS passed unretained to fuse_session_new; it outlives the
    // session loop, which is the only caller.
    StoreFS.markWorkerThread()
    guard let userdata = fuse_req_userdata(req) else { fatalError("a FUSE request without the session's StoreFS") }
    return Unmanaged<StoreFS>.fromOpaque(userdata).takeUnretainedValue()
}

/// Replies with the errno a local filesystem would give for `error`.
private func fail(_ req: fuse_req_t?, _ error: any Error) {
    let code = (error as? FurcateError)?.posixErrno ?? EIO
    fuse_reply_err(req, code)
}

private func entryParam(_ fs: StoreFS, _ ino: fuse_ino_t) throws -> fuse_entry_param {
    var e = fuse_entry_param()
    e.ino = ino
    e.attr = try fs.attr(ino)
    e.attr_timeout = fs.options.cacheTimeout
    e.entry_timeout = fs.options.cacheTimeout
    return e
}

private func replyEntry(_ req: fuse_req_t?, _ fs: StoreFS, _ ino: fuse_ino_t) throws {
    var e = try entryParam(fs, ino)
    fuse_reply_entry(req, &e)
}

private func name(_ p: UnsafePointer<CChar>?) -> String { p.map { String(cString: $0) } ?? "" }

/// Files open for writing need write access; snapshots refuse it.
private func checkOpenFlags(_ f: StoreFile, _ flags: Int32) throws {
    if f.isSnapshot && (flags & O_ACCMODE) != O_RDONLY {
        throw FurcateError(.notPermitted, "'\(f.name)' is a snapshot")
    }
}

extension StoreFS {
    func makeOperations() -> fuse_lowlevel_ops {
        var ops = fuse_lowlevel_ops()

        ops.`init` = { userdata, conn in
            guard let userdata, let conn else { return }
            let fs = Unmanaged<StoreFS>.fromOpaque(userdata).takeUnretainedValue()
            cfuse_conn_setup(conn, fs.options.maxIO, fs.options.maxIO, fs.options.writebackCache ? 1 : 0)
        }

        ops.lookup = { req, parent, cname in
            let fs = server(req)
            let n = name(cname)
            do {
                switch parent {
                case StoreFS.rootIno:
                    switch n {
                    case "files": try replyEntry(req, fs, StoreFS.filesIno)
                    case "snapshots": try replyEntry(req, fs, StoreFS.snapshotsIno)
                    default: fuse_reply_err(req, ENOENT)
                    }
                case StoreFS.filesIno, StoreFS.snapshotsIno:
                    guard (try? EntityName.validate(n)) != nil, !StoreFS.isReservedName(n),
                        let f = try? fs.store.file(n),
                        StoreFS.directory(of: f) == parent
                    else {
                        fuse_reply_err(req, ENOENT)
                        return
                    }
                    try replyEntry(req, fs, fs.fileIno(f))
                default:
                    fuse_reply_err(req, ENOTDIR)
                }
            } catch { fail(req, error) }
        }

        ops.getattr = { req, ino, _ in
            let fs = server(req)
            do {
                var st = try fs.attr(ino)
                fuse_reply_attr(req, &st, fs.options.cacheTimeout)
            } catch { fail(req, error) }
        }

        ops.setattr = { req, ino, attr, toSet, _ in
            let fs = server(req)
            do {
                if toSet & FUSE_SET_ATTR_SIZE != 0, let attr {
                    let f = try fs.file(ino)
                    try f.truncate(to: UInt64(attr.pointee.st_size))
                }
                // Mode, owner and times are fixed by the store (0644 files, 0444 snapshots);
                // changing them succeeds without effect, as on filesystems without those fields.
                var st = try fs.attr(ino)
                fuse_reply_attr(req, &st, fs.options.cacheTimeout)
            } catch { fail(req, error) }
        }

        ops.readdir = { req, ino, size, off, _ in
            let fs = server(req)
            do {
                var entries: [(String, fuse_ino_t, mode_t)] = [(".", ino, S_IFDIR), ("..", StoreFS.rootIno, S_IFDIR)]
                switch ino {
                case StoreFS.rootIno:
                    entries += [("files", StoreFS.filesIno, S_IFDIR), ("snapshots", StoreFS.snapshotsIno, S_IFDIR)]
                case StoreFS.filesIno, StoreFS.snapshotsIno:
                    let want: FileKind = ino == StoreFS.filesIno ? .file : .snapshot
                    for info in try fs.store.list() where info.kind == want && !StoreFS.isReservedName(info.name) {
                        if let f = try? fs.store.file(info.name) { entries.append((info.name, fs.fileIno(f), S_IFREG)) }
                    }
                default:
                    fuse_reply_err(req, ENOTDIR)
                    return
                }
                var buf = [CChar](repeating: 0, count: size)
                var used = 0
                var i = Int(off)
                while i < entries.count {
                    var st = stat()
                    st.st_ino = UInt(entries[i].1)
                    st.st_mode = entries[i].2
                    let need = buf.withUnsafeMutableBufferPointer { b in
                        fuse_add_direntry(
                            req, b.baseAddress.map { $0 + used }, size - used, entries[i].0, &st, off_t(i + 1))
                    }
                    if need > size - used { break }
                    used += need
                    i += 1
                }
                _ = buf.withUnsafeBufferPointer { fuse_reply_buf(req, $0.baseAddress, used) }
            } catch { fail(req, error) }
        }

        ops.open = { req, ino, fi in
            let fs = server(req)
            do {
                let f = try fs.file(ino)
                if let fi {
                    try checkOpenFlags(f, fi.pointee.flags)
                    cfuse_fi_set_keep_cache(fi, 1)
                }
                fs.opened(ino)
                if fuse_reply_open(req, fi) != 0 { fs.released(ino) }  // the opener was interrupted
            } catch { fail(req, error) }
        }

        ops.create = { req, parent, cname, _, fi in
            let fs = server(req)
            do {
                guard parent == StoreFS.filesIno else {
                    fuse_reply_err(req, parent == StoreFS.snapshotsIno ? EROFS : EACCES)
                    return
                }
                let n = name(cname)
                guard !StoreFS.isReservedName(n) else {
                    fuse_reply_err(req, EPERM)
                    return
                }
                let f = try fs.store.createFile(n)
                var e = try entryParam(fs, fs.fileIno(f))
                if let fi { cfuse_fi_set_keep_cache(fi, 1) }
                fs.opened(e.ino)
                if fuse_reply_create(req, &e, fi) != 0 { fs.released(e.ino) }
            } catch { fail(req, error) }
        }

        ops.read = { req, ino, size, off, _ in
            let fs = server(req)
            do {
                let f = try fs.file(ino)
                let buf = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
                defer { buf.deallocate() }
                let n = try f.read(into: buf, at: UInt64(off))
                fuse_reply_buf(req, buf.baseAddress?.assumingMemoryBound(to: CChar.self), n)
            } catch { fail(req, error) }
        }

        ops.write = { req, ino, data, size, off, _ in
            let fs = server(req)
            do {
                let f = try fs.file(ino)
                try f.write(UnsafeRawBufferPointer(start: data, count: size), at: UInt64(off))
                fuse_reply_write(req, size)
            } catch { fail(req, error) }
        }

        ops.flush = { req, _, _ in fuse_reply_err(req, 0) }
        ops.release = { req, ino, _ in
            server(req).released(ino)
            fuse_reply_err(req, 0)
        }

        ops.fsync = { req, ino, _, _ in
            let fs = server(req)
            do {
                try fs.file(ino).sync()
                fuse_reply_err(req, 0)
            } catch { fail(req, error) }
        }

        ops.unlink = { req, parent, cname in
            let fs = server(req)
            do {
                let n = name(cname)
                guard parent == StoreFS.filesIno || parent == StoreFS.snapshotsIno, !StoreFS.isReservedName(n),
                    let f = try? fs.store.file(n), StoreFS.directory(of: f) == parent
                else {
                    fuse_reply_err(req, ENOENT)
                    return
                }
                try fs.unlink(f)
                fuse_reply_err(req, 0)
            } catch { fail(req, error) }
        }

        ops.rename = { req, parent, cname, newParent, cnewName, flags in
            let fs = server(req)
            do {
                let from = name(cname)
                let to = name(cnewName)
                guard parent == newParent, parent == StoreFS.filesIno || parent == StoreFS.snapshotsIno else {
                    fuse_reply_err(req, EXDEV)
                    return
                }
                guard !StoreFS.isReservedName(from), let f = try? fs.store.file(from),
                    StoreFS.directory(of: f) == parent
                else {
                    fuse_reply_err(req, ENOENT)
                    return
                }
                guard !StoreFS.isReservedName(to) else {
                    fuse_reply_err(req, EPERM)
                    return
                }
                if let target = try? fs.store.file(to) {
                    if flags & 1 != 0 {  // RENAME_NOREPLACE
                        fuse_reply_err(req, EEXIST)
                        return
                    }
                    try fs.unlink(target)  // rename(2) replaces its target; open handles keep it
                }
                try fs.store.rename(from, to: to)
                fuse_reply_err(req, 0)
            } catch { fail(req, error) }
        }

        ops.statfs = { req, _ in
            let fs = server(req)
            var st = statvfs()
            if statvfs(fs.store.directory, &st) != 0 {
                fuse_reply_err(req, errno)
                return
            }
            st.f_namemax = UInt(EntityName.maxLength)
            fuse_reply_statfs(req, &st)
        }

        ops.fallocate = { req, ino, mode, off, len, _ in
            let fs = server(req)
            do {
                let f = try fs.file(ino)
                if mode == 0 {
                    // Plain allocation: extend the size; blocks are allocated when written.
                    let end = UInt64(off) + UInt64(len)
                    if end > f.size { try f.truncate(to: end) }
                } else if mode == FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE {
                    try f.punchHole(offset: UInt64(off), length: UInt64(len))
                } else if mode == FALLOC_FL_KEEP_SIZE {
                    // Preallocation without size change: nothing to do in a CoW store.
                } else {
                    fuse_reply_err(req, EOPNOTSUPP)
                    return
                }
                fuse_reply_err(req, 0)
            } catch { fail(req, error) }
        }

        ops.lseek = { req, ino, off, whence, _ in
            let fs = server(req)
            do {
                let f = try fs.file(ino)
                let pos = UInt64(max(off, 0))
                switch whence {
                case SEEK_DATA_LINUX:
                    guard let d = try f.nextData(from: pos) else {
                        fuse_reply_err(req, ENXIO)
                        return
                    }
                    fuse_reply_lseek(req, off_t(d))
                case SEEK_HOLE_LINUX:
                    guard pos < f.size else {
                        fuse_reply_err(req, ENXIO)
                        return
                    }
                    fuse_reply_lseek(req, off_t(try f.nextHole(from: pos)))
                default:
                    fuse_reply_err(req, EINVAL)
                }
            } catch { fail(req, error) }
        }

        ops.copy_file_range = { req, inoIn, offIn, _, inoOut, offOut, _, len, _ in
            let fs = server(req)
            do {
                let src = try fs.file(inoIn)
                let dst = try fs.file(inoOut)
                let srcSize = src.size
                // The whole of a file into an empty one (what `cp` does): an O(1) clone. The
                // kernel caps one request, so a request of exactly a cap's size for a larger
                // file means "the whole file" too (measured: 4 GiB arrives as 0xfffff000).
                let wantsAll =
                    UInt64(len) >= srcSize || (StoreFS.copyRequestCaps.contains(len) && srcSize > UInt64(len))
                if offIn == 0 && offOut == 0 && wantsAll && dst.size == 0 && src.id != dst.id
                    && src.blockSize == dst.blockSize
                {
                    try fs.store.replaceContents(of: dst, with: src)
                    // The reply's count is 32-bit; a larger file is reported in part and the
                    // caller's next call copies the (identical) rest.
                    fuse_reply_write(req, Int(min(srcSize, UInt64(UInt32.max) & ~4095)))
                    return
                }
                // The same range of two files with the same contents (the rest of a cloned
                // file, as `cp` asks for it): nothing to copy.
                if offIn == offOut && dst.hasSameContents(as: src) {
                    fuse_reply_write(req, Int(min(UInt64(len), srcSize - min(srcSize, UInt64(offIn)))))
                    return
                }
                // Otherwise copy bytes.
                guard UInt64(offIn) < srcSize else {
                    fuse_reply_write(req, 0)
                    return
                }
                let n = Int(min(UInt64(len), srcSize - UInt64(offIn), 16 << 20))
                let buf = try src.read(at: UInt64(offIn), count: n)
                try dst.write(buf, at: UInt64(offOut))
                fuse_reply_write(req, buf.count)
            } catch { fail(req, error) }
        }

        return ops
    }
}
