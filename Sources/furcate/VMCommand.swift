import ArgumentParser
import AsyncHTTPClient
import Foundation
import FurcateCore
import NIOCore
import NIOHTTP1
import Synchronization

/// `furcate vm`: a client of a running `furcate serve` (the Freestyle API at /v1), for people at
/// a terminal.
struct VMCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "vm",
        abstract: "Create, list, exec in, fork, snapshot and delete VMs on a running `furcate serve`.",
        subcommands: [Create.self, List.self, Exec.self, Fork.self, Snapshot.self, Remove.self])

    struct Server: ParsableArguments {
        @Option(help: "The server's URL (or FURCATE_URL).") var url: String?
        @Option(help: "An API key (or FURCATE_API_KEY; default: DATA/admin-key when readable).") var key: String?
        @OptionGroup var data: DataOption

        var baseURL: String {
            (url ?? ProcessInfo.processInfo.environment["FURCATE_URL"] ?? "http://127.0.0.1:8080").trimmingCharacters(
                in: CharacterSet(charactersIn: "/"))
        }

        func apiKey() throws -> String {
            if let key { return key }
            if let k = ProcessInfo.processInfo.environment["FURCATE_API_KEY"], !k.isEmpty { return k }
            let path = data.layout.root + "/admin-key"
            if let k = try? String(contentsOfFile: path, encoding: .utf8) {
                return k.trimmingCharacters(in: .whitespacesAndNewlines)
            }
            throw FurcateError(
                .unauthenticated, "give an API key: --key, FURCATE_API_KEY, or run where \(path) is readable")
        }

        /// One API call: the JSON body of a 2xx answer; otherwise the server's error, as one line.
        func call(_ method: HTTPMethod, _ path: String, _ body: [String: Any]? = nil) async throws -> Any {
            let key = try apiKey()
            var req = HTTPClientRequest(url: baseURL + path)
            req.method = method
            req.headers.add(name: "Authorization", value: "Bearer " + key)
            if let body {
                req.headers.add(name: "Content-Type", value: "application/json")
                req.body = .bytes(ByteBuffer(bytes: try JSONSerialization.data(withJSONObject: body)))
            }
            let response: HTTPClientResponse
            do { response = try await HTTPClient.shared.execute(req, timeout: .hours(1)) } catch {
                throw FurcateError(.unavailable, "cannot reach \(baseURL) (is `furcate serve` running?): \(error)")
            }
            let data = Data(buffer: try await response.body.collect(upTo: 256 << 20))
            let obj = (try? JSONSerialization.jsonObject(with: data)) ?? String(decoding: data, as: UTF8.self)
            guard (200..<300).contains(response.status.code) else {
                let e = obj as? [String: Any]
                let code: FurcateError.Code =
                    response.status.code == 404
                    ? .notFound : response.status.code == 401 ? .unauthenticated : .invalidArgument
                throw FurcateError(
                    code,
                    "\(response.status.code) \(e?["error"] as? String ?? ""): \(e?["message"] as? String ?? "\(obj)")")
            }
            return obj
        }
    }

    static func show(_ obj: Any) {
        if let d = try? JSONSerialization.data(withJSONObject: obj, options: [.prettyPrinted, .sortedKeys]) {
            print(String(decoding: d, as: UTF8.self))
        }
    }

    struct Create: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a VM (from --snapshot, or the default image); prints its id.")
        @OptionGroup var server: Server
        @Option(help: "Snapshot id (sc-…).") var snapshot: String?

        func run() throws {
            let (server, snapshot) = (server, snapshot)
            try runBlocking {
                let r =
                    try await server.call(.POST, "/v1/vms", snapshot.map { ["snapshotId": $0] } ?? [:])
                    as? [String: Any]
                print(r?["id"] as? String ?? "")
            }
        }
    }

    struct List: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "ls", abstract: "List your VMs.")
        @OptionGroup var server: Server
        @Flag(help: "Print the server's JSON.") var json = false

        func run() throws {
            let (server, json) = (server, json)
            try runBlocking {
                let r = try await server.call(.GET, "/v1/vms")
                if json { return VMCommand.show(r) }
                for vm in (r as? [String: Any])?["vms"] as? [[String: Any]] ?? [] {
                    print(
                        "\(vm["id"] as? String ?? "")  \((vm["state"] as? String ?? "").padding(toLength: 10, withPad: " ", startingAt: 0))  \(vm["createdAt"] as? String ?? "")  \(vm["snapshotId"] as? String ?? "")"
                    )
                }
            }
        }
    }

    struct Exec: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Run a shell command in a VM; exits with its status.")
        @OptionGroup var server: Server
        @Option(help: "Kill the command after this many seconds.") var timeout: Int = 300
        @Argument(help: "VM id.") var id: String
        @Argument(parsing: .captureForPassthrough, help: "The command (run by /bin/sh -c).") var command: [String]

        func validate() throws {
            guard (1...3600).contains(timeout) else { throw ValidationError("--timeout must be 1 to 3600 seconds") }
            guard !command.isEmpty else { throw ValidationError("give a command") }
        }

        func run() throws {
            let words = command.first == "--" ? Array(command.dropFirst()) : command
            let (server, id, command, timeout) = (server, id, words.joined(separator: " "), timeout)
            let status = Mutex(Int32(0))
            try runBlocking {
                let r =
                    try await server.call(
                        .POST, "/v1/vms/\(id)/exec-await", ["command": command, "timeoutMs": timeout * 1000])
                    as? [String: Any]
                FileHandle.standardOutput.write(Data((r?["stdout"] as? String ?? "").utf8))
                FileHandle.standardError.write(Data((r?["stderr"] as? String ?? "").utf8))
                status.withLock { $0 = Int32(r?["statusCode"] as? Int ?? 1) }
            }
            let code = status.withLock { $0 }
            if code != 0 { throw ExitCode(code) }
        }
    }

    struct Fork: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Fork a running VM N ways; prints the forks' ids.")
        @OptionGroup var server: Server
        @Option(help: "How many forks (1-100).") var count = 1
        @Argument(help: "VM id.") var id: String

        func validate() throws {
            guard (1...100).contains(count) else { throw ValidationError("--count must be 1 to 100") }
        }

        func run() throws {
            let (server, id, count) = (server, id, count)
            try runBlocking {
                let r = try await server.call(.POST, "/v1/vms/\(id)/fork", ["count": count]) as? [String: Any]
                for f in r?["forks"] as? [[String: Any]] ?? [] { print(f["id"] as? String ?? "") }
            }
        }
    }

    struct Snapshot: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Snapshot a running VM; prints the snapshot id.")
        @OptionGroup var server: Server
        @Option(help: "A name for the snapshot.") var name: String?
        @Argument(help: "VM id.") var id: String

        func run() throws {
            let (server, id, name) = (server, id, name)
            try runBlocking {
                let r =
                    try await server.call(.POST, "/v1/vms/\(id)/snapshot", name.map { ["name": $0] } ?? [:])
                    as? [String: Any]
                print(r?["snapshotId"] as? String ?? "")
            }
        }
    }

    struct Remove: ParsableCommand {
        static let configuration = CommandConfiguration(commandName: "rm", abstract: "Delete VMs.")
        @OptionGroup var server: Server
        @Argument(help: "VM ids.") var ids: [String]

        func run() throws {
            let (server, ids) = (server, ids)
            try runBlocking {
                for id in ids { _ = try await server.call(.DELETE, "/v1/vms/\(id)") }
            }
        }
    }
}
