// Accounts: API keys per account, stored hashed. Neighbours: RecordStore below; the API server
// (and `furcate keys`) above. Every VM, snapshot and build belongs to an account; a key names one.
import Crypto
import Foundation
import FurcateCore
import RecordStore

#if canImport(Glibc)
    import Glibc
#endif

/// An API key as stored: never the secret, only its SHA-256.
public struct APIKey: Codable, Sendable, Equatable {
    /// `key_` and 12 lowercase alphanumerics: how the key is listed and revoked.
    public var id: String
    /// The account the key acts for.
    public var account: String
    /// Marks the key `serve` makes for account `admin` on an empty key store (`furcate keys ls` shows
    /// it); it grants nothing beyond its account's things.
    public var admin: Bool
    /// The secret's first characters, to tell keys apart in a list.
    public var prefix: String
    /// When the key was made, Unix seconds.
    public var createdAt: Double
}

/// The key database (`keys.sqlite`): every lookup reads it, so keys made by `furcate keys
/// create` while a server runs work at once.
public final class KeyStore: Sendable {
    private let db: RecordDatabase
    private static let table = RecordTable("keys", key: "hash")
    static let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

    /// Opens (creating) the key database at `path`.
    /// - Throws: `.io` naming the database.
    public init(path: String) throws {
        db = try RecordDatabase(
            path: path, what: "API key", migrations: ["CREATE TABLE keys (hash TEXT PRIMARY KEY, record BLOB NOT NULL)"]
        )
    }

    /// Account names: 1–64 of a-z 0-9 - _, starting with a letter or digit.
    public static func validateAccount(_ name: String) throws {
        guard (1...64).contains(name.utf8.count),
            name.utf8.allSatisfy({ (97...122).contains($0) || (48...57).contains($0) || $0 == 45 || $0 == 95 }),
            let f = name.utf8.first, (97...122).contains(f) || (48...57).contains(f)
        else {
            throw FurcateError(
                .invalidArgument,
                "account '\(name.prefix(80))' must be 1-64 of a-z 0-9 - _ (starting with a letter or digit)")
        }
    }

    static func hash(_ secret: String) -> String {
        SHA256.hash(data: Data(secret.utf8)).map { String(format: "%02x", $0) }.joined()
    }

    static func random(_ n: Int, from chars: [Character]) -> String {
        var rng = SystemRandomNumberGenerator()
        return String((0..<n).map { _ in chars[Int(rng.next(upperBound: UInt64(chars.count)))] })
    }

    /// A new key for `account`: its record and the secret (`fk_` + 43 base62 characters, about
    /// 256 bits), shown once.
    public func create(account: String, admin: Bool = false) throws -> (key: APIKey, secret: String) {
        try Self.validateAccount(account)
        let secret = "fk_" + Self.random(43, from: Self.alphabet)
        let key = APIKey(
            id: "key_" + Self.random(12, from: Array("abcdefghijklmnopqrstuvwxyz0123456789")), account: account,
            admin: admin,
            prefix: String(secret.prefix(7)), createdAt: Date().timeIntervalSince1970)
        try db.save(Self.table, key: Self.hash(secret), key)
        return (key, secret)
    }

    /// The key a presented secret belongs to, or nil.
    public func authenticate(_ secret: String) throws -> APIKey? {
        guard secret.hasPrefix("fk_"), secret.utf8.count <= 128 else { return nil }
        return try db.get(Self.table, key: Self.hash(secret))
    }

    /// The keys of `account` (every account's when nil); their secrets are never stored.
    public func list(account: String? = nil) throws -> [APIKey] {
        try db.all(Self.table, as: APIKey.self).filter { account == nil || $0.account == account }
    }

    /// Revokes a key by id. - Throws: `.notFound`.
    public func revoke(_ id: String) throws {
        // Keys are few; the table is keyed by hash, so find the row by its record.
        let rows = try db.allKeyed(Self.table, as: APIKey.self)
        guard let row = rows.first(where: { $0.value.id == id }) else {
            throw FurcateError(.notFound, "no API key \(id.prefix(40))")
        }
        try db.delete(Self.table, key: row.key)
    }

    /// On an empty key store, creates an admin key for account `admin` and writes its secret to
    /// `secretPath` (mode 0600). Returns the path when it did, nil when keys existed.
    public func bootstrapAdmin(secretPath: String) throws -> String? {
        guard try list().isEmpty else { return nil }
        let (_, secret) = try create(account: "admin", admin: true)
        let fd = open(secretPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw FurcateError.system("open", errno: errno, path: secretPath) }
        defer { close(fd) }
        try Array((secret + "\n").utf8).withUnsafeBytes { try writeFully(fd, $0, path: secretPath) }
        return secretPath
    }
}
