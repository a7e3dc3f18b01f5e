import CAgentInit
import Glibc
import GuestAgentProtocol

#if canImport(FoundationEssentials)
    import FoundationEssentials
#else
    import Foundation
#endif

/// Where the account files live (tests point it elsewhere with FURCATE_AGENT_ETC).
let etcDir = getenv("FURCATE_AGENT_ETC").map { String(cString: $0) } ?? "/etc"

/// Lines of a colon-separated account file, split into fields.
func accountLines(_ file: String) -> [[String]] {
    guard let bytes = try? readAll("\(etcDir)/\(file)") else { return [] }
    return String(decoding: bytes, as: UTF8.self).split(separator: "\n").map {
        $0.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
    }
}

func appendLine(_ file: String, _ line: String) throws {
    let path = "\(etcDir)/\(file)"
    let fd = try check(open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0o644), "open", path: path)
    defer { close(fd) }
    var bytes = Array(line.utf8) + [0x0a]
    // A file not ending in a newline would glue our line onto its last one.
    if let existing = try? readAll(path), let last = existing.last, last != 0x0a { bytes.insert(0x0a, at: 0) }
    try bytes.withUnsafeBytes { p in
        guard write(fd, p.baseAddress, p.count) == p.count else { throw errnoError(errno, "write", path: path) }
    }
}

func checkAccountName(_ n: String) throws {
    let ok =
        !n.isEmpty && n.count <= 32
        && n.utf8.allSatisfy { ($0 >= 0x61 && $0 <= 0x7a) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x2d || $0 == 0x5f }
        && !(n.first?.isNumber ?? true)
    guard ok else {
        throw AgentError(
            code: "invalid_argument",
            message: "account name must be 1-32 of a-z 0-9 - _, not starting with a digit: '\(n)'")
    }
}

/// The lowest free id in the system (100-999) or regular (1000-59999) range.
func freeID(_ used: Set<UInt32>, system: Bool) throws -> UInt32 {
    let range: ClosedRange<UInt32> = system ? 100...999 : 1000...59999
    guard let id = range.first(where: { !used.contains($0) }) else {
        throw AgentError(code: "io", message: "no free id")
    }
    return id
}

func addGroup(_ g: GroupSpec) throws -> Bool {
    try checkAccountName(g.name)
    let groups = accountLines("group")
    if groups.contains(where: { $0.first == g.name }) { return false }
    let used = Set(groups.compactMap { $0.count > 2 ? UInt32($0[2]) : nil })
    let gid = try g.gid ?? freeID(used, system: g.system ?? false)
    if g.gid != nil && used.contains(gid) { throw AgentError(code: "exists", message: "gid \(gid) is taken") }
    try appendLine("group", "\(g.name):x:\(gid):")
    return true
}

func addUser(_ u: UserSpec) throws -> Bool {
    try checkAccountName(u.name)
    let users = accountLines("passwd")
    if users.contains(where: { $0.first == u.name }) { return false }
    let system = u.system ?? false
    let used = Set(users.compactMap { $0.count > 2 ? UInt32($0[2]) : nil })
    let uid = try u.uid ?? freeID(used, system: system)
    if u.uid != nil && used.contains(uid) { throw AgentError(code: "exists", message: "uid \(uid) is taken") }
    // A primary group of the user's name (as useradd does), with the same id when free.
    _ = try? addGroup(
        GroupSpec(
            name: u.name,
            gid: Set(accountLines("group").compactMap { $0.count > 2 ? UInt32($0[2]) : nil }).contains(uid) ? nil : uid,
            system: system))
    guard
        let gid = accountLines("group").first(where: { $0.first == u.name }).flatMap({
            $0.count > 2 ? UInt32($0[2]) : nil
        })
    else {
        throw AgentError(code: "io", message: "cannot create the group of \(u.name)")
    }
    let home = u.home ?? (system ? "/" : "/home/\(u.name)")
    let shell = u.shell ?? (system ? "/usr/sbin/nologin" : (access("/bin/bash", X_OK) == 0 ? "/bin/bash" : "/bin/sh"))
    let gecos = String((u.gecos ?? "").map { $0 == ":" || $0 == "\n" ? " " : $0 })
    try appendLine("passwd", "\(u.name):x:\(uid):\(gid):\(gecos):\(home):\(shell)")
    if access("\(etcDir)/shadow", F_OK) == 0 { try appendLine("shadow", "\(u.name):!:19000:0:99999:7:::") }
    for g in u.groups ?? [] { try addMember(u.name, to: g) }
    if !system && home != "/" {
        try makeDirectory(home, parents: true)
        _ = chown(home, uid, gid)
        _ = chmod(home, 0o755)
    }
    return true
}

/// Adds `user` to the member list of `group` (rewriting /etc/group atomically).
func addMember(_ user: String, to group: String) throws {
    var lines = accountLines("group")
    guard let i = lines.firstIndex(where: { $0.first == group }) else {
        throw AgentError(code: "not_found", message: "no group \(group)")
    }
    while lines[i].count < 4 { lines[i].append("") }
    var members = lines[i][3].split(separator: ",").map(String.init)
    if members.contains(user) { return }
    members.append(user)
    lines[i][3] = members.joined(separator: ",")
    let text = lines.map { $0.joined(separator: ":") }.joined(separator: "\n") + "\n"
    let tmp = "\(etcDir)/group.furcate-tmp"
    try writeFile(tmp, Data(text.utf8), offset: nil, mode: 0o644, createParents: false)
    try check(rename(tmp, "\(etcDir)/group"), "rename", path: "\(etcDir)/group")
}

/// FIFREEZE/FITHAW on the given mount points, or on every ext4/xfs/btrfs mount.
func freeze(_ mountPoints: [String]?, frozen: Bool) throws {
    let targets =
        mountPoints
        ?? procText("/proc/mounts").split(separator: "\n").compactMap { line -> String? in
            let f = line.split(separator: " ")
            return f.count > 2 && ["ext4", "xfs", "btrfs"].contains(String(f[2])) ? String(f[1]) : nil
        }
    let fifreeze: UInt = 0xC004_5877  // _IOWR('X', 119, int)
    let fithaw: UInt = 0xC004_5878  // _IOWR('X', 120, int)
    for mp in targets {
        try checkPath(mp)
        let fd = try check(open(mp, O_RDONLY | O_DIRECTORY | O_CLOEXEC), "open", path: mp)
        defer { close(fd) }
        var zero: Int32 = 0
        if ioctl(fd, frozen ? fifreeze : fithaw, &zero) != 0 {
            let e = errno
            // Freezing a frozen filesystem (EBUSY) or thawing a thawed one (EINVAL) is the goal.
            if (frozen && e == EBUSY) || (!frozen && e == EINVAL) { continue }
            throw errnoError(e, frozen ? "FIFREEZE" : "FITHAW", path: mp)
        }
    }
}

/// sync, ask init to power off, and power off anyway after the grace period.
func shutdown(graceSeconds: Int) {
    Glibc.sync()
    startThread {
        usleep(100_000)  // let the response go out first
        let systemd = access("/run/systemd/system", F_OK) == 0
        kill(1, systemd ? cagent_sigrtmin() + 4 : SIGUSR2)
        sleep(UInt32(max(1, min(graceSeconds, 600))))
        Glibc.sync()
        _ = cagent_poweroff()
    }
}
