import Accounts
import ArgumentParser
import Foundation
import FurcateCore

/// `furcate keys`: API keys of the server's accounts (stored hashed in DIR/keys.sqlite).
struct KeysCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keys", abstract: "Create, list and revoke API keys (stored hashed).",
        subcommands: [Create.self, List.self, Remove.self])

    static func open(_ data: DataOption) throws -> KeyStore {
        try FileManager.default.createDirectory(atPath: data.layout.root, withIntermediateDirectories: true)
        return try KeyStore(path: data.layout.keys)
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a key for an account; the key is the last line printed (shown once).")
        @OptionGroup var data: DataOption
        @Option(help: "The account the key acts for (a-z 0-9 - _).") var account: String
        @Flag(help: "An admin key (may manage other accounts).") var admin = false

        func run() throws {
            try reportingErrors {
                let (key, secret) = try KeysCommand.open(data).create(account: account, admin: admin)
                print("created \(key.id) for account \(key.account)\(key.admin ? " (admin)" : "")")
                print(secret)
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "ls", abstract: "List keys (ids and prefixes; never the secrets).")
        @OptionGroup var data: DataOption
        @Option(help: "Only this account's keys.") var account: String?
        @Flag(help: "Print JSON.") var json = false

        func run() throws {
            try reportingErrors {
                let keys = try KeysCommand.open(data).list(account: account)
                if json { return try printJSON(keys) }
                for k in keys { print("\(k.id)  \(k.prefix)…  \(k.account)\(k.admin ? "  admin" : "")") }
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Revoke a key by id.")
        @OptionGroup var data: DataOption
        @Argument(help: "Key id (key_…).") var id: String

        func run() throws {
            try reportingErrors { try KeysCommand.open(data).revoke(id) }
        }
    }
}
