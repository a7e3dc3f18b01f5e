import Accounts
import Foundation
import FurcateCore
import FurcateTestSupport
import Testing

@Suite(.ownThread) struct KeyStoreTests {
    @Test func keysAuthenticateAndAreStoredHashed() throws {
        let t = TempDir("keys")
        let store = try KeyStore(path: t.sub("keys.sqlite"))
        let (key, secret) = try store.create(account: "team-a")
        #expect(secret.hasPrefix("fk_") && secret.count == 46)
        #expect(try store.authenticate(secret) == key)
        #expect(try store.authenticate(secret + "x") == nil)
        #expect(try store.authenticate("Bearer " + secret) == nil)
        #expect(try store.authenticate("") == nil)
        let (other, otherSecret) = try store.create(account: "team-b")
        #expect(try store.authenticate(otherSecret)?.account == "team-b" && other.id != key.id)
        #expect(try store.list(account: "team-a").map(\.id) == [key.id])
        // Only the hash is on disk: the secret appears in no file of the database.
        for f in try FileManager.default.contentsOfDirectory(atPath: t.path) {
            let bytes = try Data(contentsOf: URL(fileURLWithPath: t.sub(f)))
            #expect(bytes.range(of: Data(secret.utf8)) == nil, "\(f) holds the secret")
        }
        // A second store over the same file (another process) sees the keys; revoke removes one.
        let again = try KeyStore(path: t.sub("keys.sqlite"))
        #expect(try again.authenticate(secret) == key)
        try again.revoke(key.id)
        #expect(try store.authenticate(secret) == nil)
        #expect(throws: FurcateError.self) { try store.revoke(key.id) }
    }

    @Test func theFirstStartMakesOneAdminKey() throws {
        let t = TempDir("admin")
        let store = try KeyStore(path: t.sub("keys.sqlite"))
        let path = try #require(try store.bootstrapAdmin(secretPath: t.sub("admin-key")))
        let secret = try String(contentsOfFile: path, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        let admin = try #require(try store.authenticate(secret))
        #expect(admin.admin && admin.account == "admin")
        var st = stat()
        #expect(stat(path, &st) == 0 && st.st_mode & 0o777 == 0o600)
        #expect(try store.bootstrapAdmin(secretPath: t.sub("admin-key-2")) == nil, "only on an empty store")
    }

    @Test(arguments: ["", "Team", "-x", "a b", String(repeating: "a", count: 65), "ü"])
    func badAccountNamesAreRefused(_ name: String) throws {
        let t = TempDir("bad")
        let store = try KeyStore(path: t.sub("keys.sqlite"))
        #expect(throws: FurcateError.self) { try store.create(account: name) }
    }
}

/// `furcate keys create|ls|rm --data DIR`.
@Suite(.ownThread) struct KeysCommandTests {
    @Test func createListRevoke() throws {
        let t = TempDir("keys-cli")
        let out = try runCommand([furcateBinary, "keys", "create", "--data", t.path, "--account", "team-a"])
        #expect(out.status == 0, "\(out.output)")
        let secret = try #require(out.output.split(separator: "\n").last.map(String.init))
        #expect(secret.hasPrefix("fk_"))
        let store = try KeyStore(path: t.sub("keys.sqlite"))
        let key = try #require(try store.authenticate(secret))
        let ls = try runCommand([furcateBinary, "keys", "ls", "--data", t.path])
        #expect(ls.output.contains(key.id) && !ls.output.contains(secret))
        #expect(try runCommand([furcateBinary, "keys", "rm", "--data", t.path, key.id]).status == 0)
        #expect(try store.authenticate(secret) == nil)
        let bad = try runCommand([furcateBinary, "keys", "create", "--data", t.path, "--account", "Not Valid"])
        #expect(bad.status != 0 && bad.output.contains("account"))
        #expect(try runCommand([furcateBinary, "keys", "rm", "--data", t.path, "key_nope"]).status != 0)
    }
}
