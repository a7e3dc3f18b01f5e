import Foundation
import FurcateBench
import Testing

#if canImport(FoundationXML)
    import FoundationXML
#endif

/// The figures `--plot` writes: well-formed SVG, bars as long as their values say, the subject
/// and its baselines told apart.
@Suite struct BarChartTests {
    final class Rects: NSObject, XMLParserDelegate {
        var widths: [Double] = []
        var fills: [String] = []
        var texts: [String] = []
        var inText = false
        func parser(
            _ p: XMLParser, didStartElement e: String, namespaceURI: String?, qualifiedName: String?,
            attributes a: [String: String]
        ) {
            if e == "rect", let w = a["width"].flatMap(Double.init), let fill = a["fill"], a["height"] != "100%" {
                widths.append(w)
                fills.append(fill)
            }
            inText = e == "text"
            if inText { texts.append("") }
        }
        func parser(_ p: XMLParser, foundCharacters s: String) { if inText { texts[texts.count - 1] += s } }
        func parser(_ p: XMLParser, didEndElement e: String, namespaceURI: String?, qualifiedName: String?) {
            inText = false
        }
    }

    func parse(_ svg: String) throws -> Rects {
        let r = Rects()
        let p = XMLParser(data: Data(svg.utf8))
        p.delegate = r
        #expect(p.parse(), "not well-formed: \(p.parserError.map { "\($0)" } ?? "")")
        return r
    }

    @Test func barsFollowTheirValues() throws {
        let linear = BarChart(
            title: "a <b> & c", unit: "MB/s",
            groups: [
                .init(
                    "job", [.init("mount", 50), .init("tmpfs", 100, baseline: true), .init("ext4", 25, baseline: true)])
            ])
        let r = try parse(linear.svg)
        #expect(r.widths.count == 3)
        #expect(abs(r.widths[0] * 2 - r.widths[1]) < 0.2 && abs(r.widths[2] * 4 - r.widths[1]) < 0.2)
        #expect(r.fills[0] != r.fills[1] && r.fills[1] == r.fills[2], "the subject stands out from its baselines")
        #expect(r.texts.contains("a <b> & c"), "titles are escaped: \(r.texts)")

        // On a log scale a 40 ms fork and a 4 s cold boot are both visible, in order.
        let log = BarChart(
            title: "fork", unit: "ms", logScale: true,
            groups: [.init("a", [.init("fork", 40), .init("boot", 4000, baseline: true)])])
        let l = try parse(log.svg)
        #expect(l.widths.count == 2 && l.widths[0] > 20 && l.widths[0] < l.widths[1])
    }
}
