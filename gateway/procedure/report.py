"""The verification report (核对报告): what the sharing units returned for one commission, signed by the gateway.

Clause 6: the agency returns its findings to the commissioner as a report, the basis on which the commissioner
decides. The report lists, per household and member, every record the units returned with the unit and the time
the unit produced it, each unit's answer status for the member, the units that did not answer, summary figures per
household, and the statutory notes (clause 16: for social-assistance review only). It is refused while queries are
still open, unless the issuing staff member explicitly issues a partial report, which then names what is missing.

The signed content is the canonical ``Report`` protobuf (:func:`sign_report`); the HTML beside it
(:func:`render_html`) is a printable rendering of the same data and is not itself signed. Anyone holding the
agency's public keys checks a report with ``hedui-keys verify-report`` or :func:`verify_signed_report_by`.

Moving the commission to "report issued", checking that the issuing staff member did neither intake nor review
(Procedure V.(一)) and storing the signed report are the workflow's steps; this module only builds, signs,
renders and verifies.
"""

from __future__ import annotations

import hashlib
import html
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hedui.v1 import agency_pb2, exchange_pb2, records_pb2
from sqlalchemy import Engine, func, select
from sqlalchemy.engine import Connection

from common.categories import DATA_NAMES, UNIT_NAMES, unit_for
from common.dates import to_pb
from common.errors import HeduiError
from common.workdays import CHINA_TZ
from gateway.db import schema as s
from keys.handles import PublicKey
from keys.identity import PartyKeys
from keys.statements import REPORT_DOMAIN, sign_statement, verify_report, verify_report_by
from keys.steps import check_report_signers
from keys.truststore import TrustStore

__all__ = [
    "FIELD_LABELS",
    "OBJECTION_WORKING_DAYS",
    "REPORT_DOMAIN",
    "ReportRefused",
    "Signer",
    "annual_income_fen",
    "beijing_time",
    "build_report",
    "describe_record",
    "mask_id_number",
    "money",
    "render_html",
    "sign_report",
    "verify_signed_report",
    "verify_signed_report_by",
]

#: Working days after receipt in which a household may ask the agency to check the result again. The Jilin
#: regulation sets no objection window (it leaves the procedure to local rules); five working days is a common
#: local choice. Change it here and every new report says so.
OBJECTION_WORKING_DAYS = 5

REGULATION = "《吉林省社会救助家庭经济状况核对工作管理办法（暂行）》"

#: Commission states in which no report can be issued (returned at intake, terminated at review).
_NO_REPORT_STATES = frozenset({"returned", "terminated"})


class ReportRefused(HeduiError):
    """The report cannot be issued as asked. The message names counts and unit ids only, never personal data."""

    code = "report_refused"

    def __init__(self, message: str, open_items: Mapping[str, int] | None = None) -> None:
        super().__init__(message)
        #: Open items per unit id, when that is why the report was refused.
        self.open_items: dict[str, int] = dict(open_items or {})


# -- building -------------------------------------------------------------------------------------------------------


@dataclass
class _Member:
    subject_id: int
    household_ref: str
    member_index: int
    message: agency_pb2.MemberFindings
    findings: list[tuple[int, str, int, records_pb2.Record]] = field(default_factory=list)


def _year_month(text: str) -> records_pb2.YearMonth:
    year, month = text.split("-")
    return records_pb2.YearMonth(year=int(year), month=int(month))


def _months(start: records_pb2.YearMonth, end: records_pb2.YearMonth) -> int:
    return max(1, (end.year - start.year) * 12 + end.month - start.month + 1)


def annual_income_fen(records: Iterable[records_pb2.Record], income_months: int) -> int:
    """The household's annual income estimate in fen, from the records of all its members.

    The rule, kept simple so that a caseworker can redo it by hand from the report:

    * tax: the sum of ``taxable_income_fen`` of every tax record, which covers the commission's income period of
      ``income_months`` months, scaled to twelve months: ``sum * 12 // income_months`` (rounded down to the fen);
    * social insurance: ``monthly_benefit_fen * 12`` (pensions and other monthly benefits being paid);
    * employment: ``monthly_unemployment_benefit_fen * 12``;
    * state payroll: ``monthly_salary_fen * 12``.

    Nothing else counts (assets, subsidies and assistance already received are listed, not added). Wages on which
    no tax record exists are not visible to this estimate: it is a figure for the caseworker, not a decision.
    """
    months = max(1, income_months)
    taxable = 0
    monthly = 0
    for record in records:
        body = record.WhichOneof("body")
        if body == "tax":
            taxable += record.tax.taxable_income_fen
        elif body == "social_insurance":
            monthly += record.social_insurance.monthly_benefit_fen
        elif body == "employment":
            monthly += record.employment.monthly_unemployment_benefit_fen
        elif body == "state_payroll":
            monthly += record.state_payroll.monthly_salary_fen
    return taxable * 12 // months + monthly * 12


def _summary(members: Sequence[agency_pb2.MemberFindings], income_months: int) -> agency_pb2.HouseholdSummary:
    summary = agency_pb2.HouseholdSummary()
    records = [f.record for m in members for f in m.findings]
    for member in members:
        if any(
            f.record.WhichOneof("body") == "deposit_threshold" and f.record.deposit_threshold.above_limit
            for f in member.findings
        ):
            summary.deposits_above_limit += 1
    kinds = Counter(r.WhichOneof("body") for r in records)
    summary.deposits_fen = sum(r.deposit.balance_fen for r in records if r.WhichOneof("body") == "deposit")
    summary.properties = kinds["real_estate"]
    summary.vehicles = kinds["vehicle"]
    summary.business_roles = kinds["business"]
    summary.annual_income_fen = annual_income_fen(records, income_months)
    return summary


def _unit_label(unit_id: str, categories: Mapping[str, int]) -> str:
    name = UNIT_NAMES.get(categories.get(unit_id, records_pb2.UNIT_CATEGORY_OTHER), "其他")
    return f"{name}（{unit_id}）"


def _footnotes(
    *,
    partial: bool,
    issued_by: str,
    open_items: Mapping[str, int],
    cancelled: Mapping[str, int],
    categories: Mapping[str, int],
    income_months: int,
) -> list[str]:
    notes = [
        f"本报告仅用于社会救助审核审批，不得用于其他用途，不得向与核对工作无关的组织或个人泄露"
        f"（{REGULATION}第十六条）。",
        f"核对结果依据信息共享单位反馈数据出具，各项记录注明反馈单位及数据产生时间；信息共享单位对其提供数据的"
        f"时效性与准确性负责（{REGULATION}第五条）。本报告作为委托单位审批社会救助项目的重要依据（第六条）。",
        f"如对核对结果有异议，可在收到报告之日起{OBJECTION_WORKING_DAYS}个工作日内向核对机构提出复核申请"
        f"（{REGULATION}未规定异议期限，依本地规定执行）。",
        "本报告仅含本级核对机构的核对结果；由上级核对机构核对的信息以其出具的核对报告为准"
        "（《吉林省社会救助家庭经济状况核对工作操作规程》三）。",
        f"年收入估算口径：纳税记录的收入额按{income_months}个月核对期间折算为12个月，加社会保险月待遇、"
        "月失业保险金、财政供养月工资各乘以12；存款、不动产等财产及已获救助不计入。估算仅供参考，以审批机关认定为准。",
    ]
    if partial and open_items:
        missing = "、".join(f"{_unit_label(u, categories)}{n}项" for u, n in sorted(open_items.items()))
        notes.append(
            f"部分报告：出具时以下信息共享单位尚未反馈数据，共{sum(open_items.values())}项查询：{missing}。"
            f"本报告由出具人员{issued_by}明确决定在数据不完整时出具，上述单位的核对信息未包含在内。"
        )
    if cancelled:
        withdrawn = "、".join(f"{_unit_label(u, categories)}{n}项" for u, n in sorted(cancelled.items()))
        notes.append(f"以下查询已撤销，相关单位未反馈数据：{withdrawn}。")
    return notes


def _open_items_refusal(conn: Connection, ref: str, commission_id: int, missing: Mapping[str, int]) -> str:
    """Why a complete report cannot be issued yet, and what helps: waiting helps items still on their way, not
    items in batches a unit refused for good (state failed), which nobody sends again until an operator fixes the
    cause and runs ``hedui-gateway resend``."""
    refused: dict[str, int] = dict(
        conn.execute(
            select(s.items.c.unit_id, func.count())
            .select_from(s.items.join(s.batches, s.batches.c.batch_id == s.items.c.batch_id))
            .where(
                s.items.c.commission_id == commission_id,
                s.items.c.cancelled_at_ms.is_(None),
                s.batches.c.state == "failed",
            )
            .group_by(s.items.c.unit_id)
        ).all()
    )
    units = ", ".join(f"{unit} ({count})" for unit, count in sorted(missing.items()))
    text = f"{sum(missing.values())} item(s) of commission {ref} are still open at {len(missing)} unit(s): {units}."
    if refused:
        failed = ", ".join(f"{unit} ({count})" for unit, count in sorted(refused.items()))
        waiting = sum(missing.values()) - sum(refused.values())
        text += (
            f" The unit(s) refused the batches of {sum(refused.values())} of them for good: {failed}; they will not be "
            "sent again by themselves: the gateway's operator fixes the cause (the unit's reason is in the gateway's "
            "log) and runs 'hedui-gateway resend --unit UNIT'."
        )
        if waiting:
            text += f" Wait for the answers to the other {waiting},"
        else:
            text += " Then wait for the answers,"
        return text + " or issue a partial report that names these units as missing."
    return text + " Wait for the answers, or issue a partial report that names these units as missing."


def build_report(
    source: Engine | Connection,
    commission_id: int,
    *,
    agency: str,
    issued_by: str,
    partial: bool,
    now_ms: int,
) -> agency_pb2.Report:
    """The report of commission ``commission_id`` (the database id) as it stands at ``now_ms``.

    Raises ReportRefused when the commission does not exist, was returned, terminated or cancelled, has no
    queries, or has queries still open (no answer, not cancelled) and ``partial`` is false. A partial report lists
    the units with open items in ``units_not_answered`` and says so in a footnote. Nothing is written.
    """
    if isinstance(source, Engine):
        with source.connect() as conn:
            return _build(conn, commission_id, agency=agency, issued_by=issued_by, partial=partial, now_ms=now_ms)
    return _build(source, commission_id, agency=agency, issued_by=issued_by, partial=partial, now_ms=now_ms)


def _build(
    conn: Connection, commission_id: int, *, agency: str, issued_by: str, partial: bool, now_ms: int
) -> agency_pb2.Report:
    c = conn.execute(select(s.commissions).where(s.commissions.c.id == commission_id)).first()
    if c is None:
        raise ReportRefused("the commission does not exist")
    if c.cancelled_at_ms is not None or c.state in _NO_REPORT_STATES:
        state = "cancelled" if c.cancelled_at_ms is not None else c.state
        raise ReportRefused(f"commission {c.ref} was {state}: no report is issued for it")
    answered = s.answers.c.item_id.is_not(None)
    joined = s.items.outerjoin(s.answers, s.answers.c.item_id == s.items.c.id)
    missing: dict[str, int] = {}
    cancelled: dict[str, int] = {}
    for unit_id, is_cancelled, count in conn.execute(
        select(s.items.c.unit_id, s.items.c.cancelled_at_ms.is_not(None), func.count())
        .select_from(joined)
        .where(s.items.c.commission_id == commission_id, ~answered)
        .group_by(s.items.c.unit_id, s.items.c.cancelled_at_ms.is_not(None))
    ):
        target = cancelled if is_cancelled else missing
        target[unit_id] = target.get(unit_id, 0) + int(count)
    if missing and not partial:
        raise ReportRefused(_open_items_refusal(conn, c.ref, commission_id, missing), missing)
    if not conn.execute(select(func.count()).where(s.items.c.commission_id == commission_id)).scalar_one():
        raise ReportRefused(f"commission {c.ref} has no queries yet: nothing to report")

    categories = {r.unit_id: r.category for r in conn.execute(select(s.units.c.unit_id, s.units.c.category))}
    income_from, income_to = _year_month(c.income_from), _year_month(c.income_to)
    months = _months(income_from, income_to)

    members: dict[int, _Member] = {}
    for p in conn.execute(
        select(
            s.subjects.c.id,
            s.subjects.c.household_ref,
            s.subjects.c.member_index,
            s.subjects.c.relation,
            s.subjects.c.name,
            s.subjects.c.id_number,
        )
        .where(s.subjects.c.commission_id == commission_id)
        .order_by(s.subjects.c.id)
    ):
        members[p.id] = _Member(
            subject_id=p.id,
            household_ref=p.household_ref or "",
            member_index=p.member_index or 0,
            message=agency_pb2.MemberFindings(
                member_index=p.member_index or 0,
                relation=p.relation or agency_pb2.RELATION_UNSPECIFIED,
                name=p.name,
                id_number=p.id_number,
            ),
        )

    for item in conn.execute(
        select(s.items.c.id, s.items.c.subject_id, s.items.c.unit_id, s.answers.c.status, s.answers.c.body)
        .select_from(s.items.join(s.answers, s.answers.c.item_id == s.items.c.id))
        .where(s.items.c.commission_id == commission_id)
        .order_by(s.items.c.id)
    ):
        try:
            answer = exchange_pb2.SubjectAnswer.FromString(item.body)
        except DecodeError as exc:
            raise ReportRefused(
                f"the stored answer of item {item.id} cannot be read: the database is damaged; restore it"
            ) from exc
        member = members[item.subject_id]
        member.message.unit_status[item.unit_id] = item.status
        for position, record in enumerate(answer.records):
            member.findings.append((record.category, item.unit_id, position, record))

    households: dict[str, list[_Member]] = {}
    for member in members.values():  # in subject order: households appear as the package listed them
        households.setdefault(member.household_ref, []).append(member)

    report = agency_pb2.Report(
        commission_id=c.ref,
        letter_number=c.letter_number or "",
        commissioner=c.commissioner or "",
        agency=agency,
        issued_at_ms=now_ms,
        issued_by=issued_by,
        partial=bool(missing),
        units_not_answered=sorted(set(missing) | set(cancelled)),
        programme=c.purpose,
        income_from=income_from,
        income_to=income_to,
        assets_as_of=to_pb(c.assets_as_of),
        footnotes=_footnotes(
            partial=bool(missing),
            issued_by=issued_by,
            open_items=missing,
            cancelled=cancelled,
            categories=categories,
            income_months=months,
        ),
        open_units=_open_units(conn, commission_id, missing),
    )
    report.footnotes.extend(_due_note(report.open_units, categories))
    for ref, group in households.items():
        household = report.households.add(household_ref=ref)
        for member in sorted(group, key=lambda m: (m.member_index, m.subject_id)):
            for category, unit_id, _, record in sorted(member.findings, key=lambda f: f[:3]):
                member.message.findings.add(category=category, unit_id=unit_id, record=record)
            household.members.append(member.message)
        household.summary.CopyFrom(_summary(household.members, months))
    return report


def _open_units(conn: Connection, commission_id: int, units: Iterable[str]) -> list[agency_pb2.UnitDue]:
    """Each unit's latest due date among the commission's receipted batches, and whether it is provisional (items
    not yet receipted have no due date and give no entry)."""
    wanted = sorted(units)
    if not wanted:
        return []
    b = s.batches.c
    latest: dict[str, tuple[date, bool]] = {}
    for unit_id, due, provisional in conn.execute(
        select(b.unit_id, b.due, b.due_provisional).where(
            b.commission_id == commission_id, b.state == "receipted", b.unit_id.in_(wanted), b.due.is_not(None)
        )
    ):
        known = latest.get(unit_id)
        if known is None or due > known[0] or (due == known[0] and provisional):
            latest[unit_id] = (due, bool(provisional))
    return [
        agency_pb2.UnitDue(unit_id=u, due_date=to_pb(d), due_date_provisional=p) for u, (d, p) in sorted(latest.items())
    ]


def _due_note(open_units: Sequence[agency_pb2.UnitDue], categories: Mapping[str, int]) -> list[str]:
    provisional = [u for u in open_units if u.due_date_provisional]
    if not provisional:
        return []
    units = "、".join(
        f"{_unit_label(u.unit_id, categories)}{u.due_date.year}年{u.due_date.month}月{u.due_date.day}日"
        for u in provisional
    )
    return [
        f"以下信息共享单位的答复期限为暂定日期：{units}。出具时工作日历尚无该年度国务院办公厅部分节假日安排，"
        "该年度按周一至周五为工作日、周六周日为休息日计算；实际期限在节假日或调休上班日落入期间时可能推后或提前，"
        f"以该年度安排公布后重新计算的日期为准（{REGULATION}第十二条）。"
    ]


# -- signing and verifying ----------------------------------------------------------------------------------------


def sign_report(
    report: agency_pb2.Report, party: PartyKeys, now_ms: int, *, signers: Mapping[str, Signer] | None = None
) -> agency_pb2.SignedReport:
    """The report signed by ``party``'s current signing key, with its printable HTML beside it (``signers``: the
    names and keys of the staff who signed its steps and approvals, from the staff register, for the HTML).

    The party must be the agency the report names, and its signing key must be valid at the report's issue time
    (otherwise no one could ever verify it): ValueError if not.
    """
    if report.agency != party.party_id:
        raise ValueError(f"the report names agency {report.agency or '-'}; party {party.party_id} cannot sign it")
    key = party.signing_key(now_ms)
    record = party.record(key.key_id)
    if record is None or not record.valid_at(report.issued_at_ms):
        raise ValueError("the signing key is not valid at the report's issue time; issue the report again now")
    data = report.SerializeToString(deterministic=True)
    return agency_pb2.SignedReport(
        report=data,
        signer_key_id=key.key_id,
        signature=sign_statement(REPORT_DOMAIN, data, key),
        html=render_html(report, signer_key_id=key.key_id, signers=signers),
    )


def verify_signed_report(signed: agency_pb2.SignedReport, public_key: PublicKey) -> agency_pb2.Report:
    """The report inside ``signed`` once its signature verifies with ``public_key``; keys.TrustError otherwise.

    The HTML beside the signature is not checked: render the returned report to print it."""
    return verify_report(signed, public_key)


def verify_signed_report_by(signed: agency_pb2.SignedReport, trust: TrustStore, party_id: str) -> agency_pb2.Report:
    """The report inside ``signed`` once it verifies as issued by ``party_id`` with a key from ``trust`` that was
    valid at the report's issue time; keys.TrustError otherwise."""
    return verify_report_by(signed, trust.keyring(party_id), party_id)


# -- rendering ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Signer:
    """A staff member who signed a step or an approval, as the printable report shows them: the name registered in
    the staff register (kept out of ``repr``) and their key's fingerprint."""

    name: str = field(repr=False)
    fingerprint: str

    @property
    def short_fingerprint(self) -> str:
        """The first three groups of the fingerprint (15 digits), enough to compare with the staff register."""
        return " ".join(self.fingerprint.split()[:3])


_STEP_LABELS: Mapping[str, str] = {
    "intake": "受理初审",
    "review": "审核复审",
    "report": "出具报告",
    "approval": "数据交换审批",
}
_OUTCOMES: Mapping[str, tuple[str, str]] = {
    "intake": ("通过", "退回"),
    "review": ("通过", "终止"),
    "report": ("出具", "出具"),
    "approval": ("同意", "同意"),
}


def _signatures_html(report: agency_pb2.Report, signers: Mapping[str, Signer]) -> list[str]:
    """Who signed each step and approval (Procedure V.(一)(二)), with the name and key from the staff register."""
    found = check_report_signers(report)
    rows = []
    for signer in (*found.steps, *found.approvals):
        who = signers.get(signer.staff_id)
        passed, failed = _OUTCOMES[signer.label]
        rows.append(
            f"<tr><td>{_escape(_STEP_LABELS[signer.label])}</td><td>{_escape(passed if signer.passed else failed)}"
            f"</td><td>{_escape(signer.staff_id)}</td><td>{_escape(who.name if who else '（未登记）')}</td>"
            f"<td><code>{_escape(who.short_fingerprint + ' …' if who else '—')}</code></td>"
            f'<td class="time">{_escape(beijing_time(signer.at_ms))}</td></tr>'
        )
    if not rows:
        return []
    out = [
        "<h2>经办签署</h2>",
        "<table><thead><tr><th>环节</th><th>结论</th><th>人员编号</th><th>姓名</th><th>密钥指纹（前三组）</th>"
        "<th>签署时间（北京时间）</th></tr></thead><tbody>",
        *rows,
        "</tbody></table>",
    ]
    if found.three_different_people:
        out.append("<p>受理初审、审核复审、出具报告由三名不同工作人员完成（操作规程五（一））。</p>")
    if found.two_distinct_approvers:
        out.append(f"<p>数据交换经{len(found.approvals)}名不同工作人员审批（操作规程五（二））。</p>")
    out.append(
        "<p>各环节由经办人员以其在人员名录中登记的密钥对环节内容签名，网关核验签名后方予记录；签名随报告数据一并签发。"
        "持有经办人员公钥者可执行 <code>hedui-keys verify-report 报告文件 --staff-keys 人员公钥清单</code>"
        " 逐项核验。</p>"
    )
    return out


def _due_html(due: agency_pb2.UnitDue | None) -> str:
    if due is None:
        return ""
    d = due.due_date
    kind = "（暂定，见说明）" if due.due_date_provisional else ""
    return f"，答复期限 {d.year:04d}-{d.month:02d}-{d.day:02d}{kind}"


PROGRAMME_NAMES: Mapping[int, str] = {
    exchange_pb2.PROGRAMME_MINIMUM_LIVING_ALLOWANCE: "最低生活保障",
    exchange_pb2.PROGRAMME_EXTREME_POVERTY_SUPPORT: "特困人员救助供养",
    exchange_pb2.PROGRAMME_MEDICAL_AID: "医疗救助",
    exchange_pb2.PROGRAMME_TEMPORARY_AID: "临时救助",
    exchange_pb2.PROGRAMME_EDUCATION_AID: "教育救助",
    exchange_pb2.PROGRAMME_HOUSING_AID: "住房救助",
    exchange_pb2.PROGRAMME_EMPLOYMENT_AID: "就业救助",
    exchange_pb2.PROGRAMME_OTHER: "其他社会救助",
}

RELATION_NAMES: Mapping[int, str] = {
    agency_pb2.RELATION_APPLICANT: "申请人",
    agency_pb2.RELATION_FAMILY_MEMBER: "共同生活的家庭成员",
    agency_pb2.RELATION_SUPPORT_OBLIGOR: "赡（抚、扶）养义务人",
}

STATUS_NAMES: Mapping[int, str] = {
    exchange_pb2.SUBJECT_STATUS_FOUND: "查得记录",
    exchange_pb2.SUBJECT_STATUS_NO_RECORD: "无记录",
    exchange_pb2.SUBJECT_STATUS_NAME_MISMATCH: "姓名与身份证号不符",
    exchange_pb2.SUBJECT_STATUS_INVALID_ID: "身份证号无效",
    exchange_pb2.SUBJECT_STATUS_NOT_AUTHORISED: "未获授权",
}

BUSINESS_ROLE_NAMES: Mapping[int, str] = {
    records_pb2.BUSINESS_ROLE_LEGAL_REPRESENTATIVE: "法定代表人",
    records_pb2.BUSINESS_ROLE_INVESTOR: "出资人（股东）",
    records_pb2.BUSINESS_ROLE_SOLE_TRADER: "个体工商户经营者",
}

#: The label of every field of every record body (a test checks that none is missing).
FIELD_LABELS: Mapping[str, str] = {
    "above_limit": "超过限额",
    "account_suffix": "账号尾号",
    "address": "地址",
    "aid_type": "资助类型",
    "amount_fen": "金额",
    "annual_premium_fen": "年缴保费",
    "area_centi_m2": "面积",
    "as_of": "截至日期",
    "balance_fen": "余额",
    "benefits_paid_fen": "已获给付",
    "cash_balance_fen": "资金余额",
    "cash_value_fen": "现金价值",
    "certificate_no": "证书编号",
    "co_owner_count": "其他共有人数",
    "contract_date": "合同日期",
    "contract_no": "合同编号",
    "contribution_base_fen": "缴费基数",
    "credit_code": "统一社会信用代码",
    "date_of_death": "死亡日期",
    "disability_type": "残疾类别",
    "employer": "工作单位",
    "enterprise_name": "企业名称",
    "established_on": "成立日期",
    "first_registration": "初次登记日期",
    "fund_market_value_fen": "基金市值",
    "grade": "等级",
    "gross_tonnage": "总吨位",
    "holding_fen": "持有金额",
    "household_no": "户号",
    "institution": "机构",
    "insurance_type": "险种",
    "insurer": "保险机构",
    "interest_subsidy_fen": "贴息金额",
    "issued_on": "发证日期",
    "large_medical_costs_fen": "大额医疗费用",
    "last_contribution": "最近缴费年月",
    "limit_fen": "限额",
    "loan_outstanding_fen": "贷款余额",
    "loan_type": "贷款类型",
    "location": "坐落",
    "maturity_date": "到期日期",
    "model": "品牌型号",
    "monthly_amount_fen": "月救助金额",
    "monthly_benefit_fen": "月待遇",
    "monthly_contribution_fen": "月缴存额",
    "monthly_salary_fen": "月工资",
    "monthly_unemployment_benefit_fen": "月失业保险金",
    "organisation": "单位",
    "outstanding_fen": "未还余额",
    "ownership": "共有情况",
    "period_from": "所属期起",
    "period_to": "所属期止",
    "plate": "号牌号码",
    "policy_type": "险种",
    "post_type": "编制类型",
    "price_fen": "成交价格",
    "principal_fen": "本金",
    "product": "存款种类",
    "product_name": "产品名称",
    "programme": "救助项目",
    "qualification_type": "资格类别",
    "registered_capital_fen": "注册资本",
    "registered_on": "登记日期",
    "registration_no": "登记号",
    "relation_to_head": "与户主关系",
    "role": "身份",
    "scheme": "险种",
    "self_employed": "个体经营",
    "share_basis_points": "出资比例",
    "since": "起始日期",
    "start_date": "起始日期",
    "status": "状态",
    "stock_market_value_fen": "股票市值",
    "subsidy_type": "补贴类型",
    "tax_paid_fen": "已缴税额",
    "tax_type": "税种",
    "taxable_income_fen": "收入额",
    "use": "用途",
    "valid_until": "有效期至",
    "vehicle_type": "车辆类型",
    "vessel_type": "船舶类型",
    "year": "年度",
}

_UNITS_SUFFIX: Mapping[str, str] = {"co_owner_count": "人", "grade": "级", "gross_tonnage": "吨", "year": "年"}


def money(fen: int) -> str:
    """Fen as yuan for people: 123456 -> ¥1,234.56."""
    sign = "-" if fen < 0 else ""
    yuan, cents = divmod(abs(fen), 100)
    return f"{sign}¥{yuan:,}.{cents:02d}"


def beijing_time(ms: int) -> str:
    """Milliseconds since the epoch as Beijing time, to the second."""
    return datetime.fromtimestamp(ms / 1000, tz=CHINA_TZ).strftime("%Y-%m-%d %H:%M:%S")


def mask_id_number(id_number: str) -> str:
    """An ID number with the birth date and sequence hidden (220102********1234): enough to tell members apart and
    to match a printout against the file, and no full number lying on a desk."""
    if len(id_number) < 11:
        return "*" * len(id_number)
    return id_number[:6] + "*" * (len(id_number) - 10) + id_number[-4:]


def _date(d: records_pb2.Date) -> str:
    return f"{d.year:04d}-{d.month:02d}-{d.day:02d}"


def _value(name: str, value: object, is_enum: bool) -> str | None:
    """The shown value of one record field, or None to leave an empty text or an absent date out."""
    if isinstance(value, records_pb2.Date):
        return _date(value) if value.year else None
    if isinstance(value, records_pb2.YearMonth):
        return f"{value.year:04d}-{value.month:02d}" if value.year else None
    if isinstance(value, str):
        return value or None
    if isinstance(value, bool):
        return "是" if value else "否"
    if not isinstance(value, int):
        return None
    if is_enum:
        return BUSINESS_ROLE_NAMES.get(value, "未说明")
    if name.endswith("_fen"):
        return money(value)
    if name == "area_centi_m2":
        return f"{value // 100}.{value % 100:02d} 平方米"
    if name == "share_basis_points":
        return f"{value // 100}.{value % 100:02d}%"
    return f"{value}{_UNITS_SUFFIX.get(name, '')}"


def describe_record(record: records_pb2.Record) -> list[tuple[str, str]]:
    """(label, value) pairs of a record's body in field order, in Chinese, for people to read."""
    body_name = record.WhichOneof("body")
    if body_name is None:
        return []
    body: Message = getattr(record, body_name)
    pairs = []
    for fd in body.DESCRIPTOR.fields:
        shown = _value(fd.name, getattr(body, fd.name), fd.type == FieldDescriptor.TYPE_ENUM)
        if shown is not None:
            pairs.append((FIELD_LABELS.get(fd.name, fd.name), shown))
    return pairs


_CSS = """
@page { size: A4; margin: 15mm 12mm 18mm 12mm; }
* { box-sizing: border-box; }
body { font-family: "Noto Serif CJK SC", "Source Han Serif SC", "SimSun", "Songti SC", serif; font-size: 10.5pt;
       color: #000; margin: 0 auto; max-width: 186mm; line-height: 1.45; }
h1 { font-size: 18pt; text-align: center; margin: 4mm 0 2mm; letter-spacing: 0.1em; }
h2 { font-size: 13pt; margin: 6mm 0 2mm; border-bottom: 1.5pt solid #000; }
h3 { font-size: 11pt; margin: 4mm 0 1mm; }
table { width: 100%; border-collapse: collapse; margin: 1mm 0 3mm; page-break-inside: auto; }
thead { display: table-header-group; }
tr { page-break-inside: avoid; }
th, td { border: 0.5pt solid #000; padding: 1mm 1.5mm; vertical-align: top; text-align: left; }
th { background: #eee; font-weight: bold; -webkit-print-color-adjust: exact; print-color-adjust: exact; }
.classified { text-align: right; font-weight: bold; }
.partial { border: 2pt solid #000; padding: 2mm; font-weight: bold; text-align: center; font-size: 12pt; }
.header th { width: 28%; }
.num { text-align: right; white-space: nowrap; }
.time { white-space: nowrap; font-size: 9pt; }
.household { page-break-before: auto; }
.muted { color: #444; font-size: 9pt; }
.notes li { margin-bottom: 1mm; }
.signature td { height: 12mm; }
code { font-family: "Noto Sans Mono CJK SC", monospace; font-size: 9pt; word-break: break-all; }
@media screen { body { padding: 10mm; } }
"""


def _escape(value: object) -> str:
    return html.escape(str(value), quote=True)


def _finding_unit(finding: agency_pb2.Finding) -> str:
    try:
        name = UNIT_NAMES[unit_for(finding.category)]
    except KeyError:
        name = "其他"
    return f"{name}（{finding.unit_id}）"


def _status_line(member: agency_pb2.MemberFindings, not_answered: Sequence[str]) -> str:
    parts = [f"{unit}：{STATUS_NAMES.get(status, '未说明')}" for unit, status in sorted(member.unit_status.items())]
    parts += [f"{unit}：未反馈" for unit in not_answered if unit not in member.unit_status]
    return "；".join(parts) or "无"


def _member_html(seq: int, member: agency_pb2.MemberFindings, not_answered: Sequence[str], mask_ids: bool) -> str:
    number = mask_id_number(member.id_number) if mask_ids else member.id_number
    relation = RELATION_NAMES.get(member.relation, "未说明")
    out = [
        f"<h3>{seq}. {_escape(member.name)}（{_escape(relation)}，{_escape(number)}）</h3>",
        f'<p class="muted">各单位反馈情况：{_escape(_status_line(member, not_answered))}</p>',
    ]
    if not member.findings:
        out.append("<p>各已反馈单位均未查得该成员的记录。</p>")
        return "\n".join(out)
    out.append(
        "<table><thead><tr><th>核对项目</th><th>反馈单位</th><th>核对结果</th><th>数据产生时间（北京时间）</th>"
        "</tr></thead><tbody>"
    )
    groups: dict[int, list[agency_pb2.Finding]] = {}
    for finding in member.findings:
        groups.setdefault(finding.category, []).append(finding)
    for category, findings in groups.items():
        for i, finding in enumerate(findings):
            head = ""
            if i == 0:
                head = f'<td rowspan="{len(findings)}">{_escape(DATA_NAMES.get(category, "其他"))}</td>'
            content = "；".join(f"{label}：{value}" for label, value in describe_record(finding.record))
            out.append(
                f"<tr>{head}<td>{_escape(_finding_unit(finding))}</td><td>{_escape(content)}</td>"
                f'<td class="time">{_escape(beijing_time(finding.record.produced_at_ms))}</td></tr>'
            )
    out.append("</tbody></table>")
    return "\n".join(out)


def _summary_html(summary: agency_pb2.HouseholdSummary) -> str:
    rows = [
        ("存款余额合计（按金额反馈的存款）", money(summary.deposits_fen)),
        ("存款超过限额的成员（按限额反馈）", f"{summary.deposits_above_limit} 人"),
        ("不动产", f"{summary.properties} 处"),
        ("机动车辆", f"{summary.vehicles} 辆"),
        ("工商登记、股权", f"{summary.business_roles} 项"),
        ("年收入估算（口径见说明）", money(summary.annual_income_fen)),
    ]
    cells = "".join(f'<tr><th>{_escape(k)}</th><td class="num">{_escape(v)}</td></tr>' for k, v in rows)
    return f'<table><thead><tr><th colspan="2">家庭汇总</th></tr></thead><tbody>{cells}</tbody></table>'


def render_html(
    report: agency_pb2.Report,
    *,
    signer_key_id: bytes = b"",
    mask_ids: bool = True,
    signers: Mapping[str, Signer] | None = None,
) -> str:
    """The report as a self-contained printable HTML page (A4, Chinese). Every value from the report is escaped;
    ID numbers are masked unless ``mask_ids`` is false (full numbers on paper are a leak risk, clause 16).
    ``signers`` gives the name and key of each staff id that signed a step or approval (the staff register's)."""
    digest = hashlib.sha256(report.SerializeToString(deterministic=True)).hexdigest()
    period = (
        f"{report.income_from.year}年{report.income_from.month:02d}月至"
        f"{report.income_to.year}年{report.income_to.month:02d}月"
    )
    assets = report.assets_as_of
    header = [
        ("委托编号", report.commission_id),
        ("委托书编号", report.letter_number or "—"),
        ("委托单位", report.commissioner or "—"),
        ("核对机构", report.agency),
        ("救助项目", PROGRAMME_NAMES.get(report.programme, "未说明")),
        ("收入核对期间", period),
        ("财产核对基准日", f"{assets.year}年{assets.month:02d}月{assets.day:02d}日"),
        ("出具时间", f"{beijing_time(report.issued_at_ms)}（北京时间）"),
        ("出具人员", report.issued_by),
    ]
    out = [
        '<!DOCTYPE html>\n<html lang="zh-CN">\n<head>\n<meta charset="utf-8">',
        f"<title>核对报告 {_escape(report.commission_id)}</title>",
        f"<style>{_CSS}</style>\n</head>\n<body>",
        '<p class="classified">内部资料 注意保密</p>',
        "<h1>社会救助家庭经济状况核对报告</h1>",
    ]
    if report.partial:
        out.append('<p class="partial">部分报告：出具时尚有信息共享单位未反馈数据，详见“未反馈单位”和说明。</p>')
    out.append('<table class="header"><tbody>')
    out += [f"<tr><th>{_escape(k)}</th><td>{_escape(v)}</td></tr>" for k, v in header]
    out.append("</tbody></table>")
    for household in report.households:
        out.append('<section class="household">')
        out.append(f"<h2>家庭 {_escape(household.household_ref or '—')}（共{len(household.members)}人）</h2>")
        out.append(
            "<table><thead><tr><th>序号</th><th>与申请人关系</th><th>姓名</th><th>公民身份号码</th></tr></thead><tbody>"
        )
        for seq, member in enumerate(household.members, 1):
            number = mask_id_number(member.id_number) if mask_ids else member.id_number
            relation = RELATION_NAMES.get(member.relation, "未说明")
            out.append(
                f"<tr><td>{seq}</td><td>{_escape(relation)}</td><td>{_escape(member.name)}</td>"
                f"<td>{_escape(number)}</td></tr>"
            )
        out.append("</tbody></table>")
        for seq, member in enumerate(household.members, 1):
            out.append(_member_html(seq, member, report.units_not_answered, mask_ids))
        out.append(_summary_html(household.summary))
        out.append("</section>")
    out.append("<h2>未反馈单位</h2>")
    if report.units_not_answered:
        dues = {u.unit_id: u for u in report.open_units}
        out.append(
            "<ul>"
            + "".join(f"<li>{_escape(u)}：未反馈{_due_html(dues.get(u))}</li>" for u in report.units_not_answered)
            + "</ul>"
        )
    else:
        out.append("<p>无：全部信息共享单位均已反馈。</p>")
    out.append('<h2>说明</h2>\n<ol class="notes">')
    out += [f"<li>{_escape(note)}</li>" for note in report.footnotes]
    out.append("</ol>")
    out += _signatures_html(report, signers or {})
    out.append("<h2>签名与核验</h2>")
    out.append(
        "<table><tbody>"
        f"<tr><th>签名密钥标识</th><td><code>{_escape(signer_key_id.hex() or '（未签名）')}</code></td></tr>"
        f"<tr><th>报告数据摘要（SHA-256）</th><td><code>{digest}</code></td></tr>"
        "</tbody></table>"
    )
    out.append(
        "<p>本页为核对机构以数字签名出具的报告数据的打印版本，以签名的报告数据为准。核验方法：取得报告文件后执行 "
        f"<code>hedui-keys verify-report 报告文件</code>（已导入{_escape(report.agency)}的公钥），或 "
        "<code>hedui-keys verify-report 报告文件 --bundle 公钥包 --fingerprint 指纹</code>，"
        "核验通过后比对上述摘要与标识。</p>"
    )
    out.append(
        '<table class="signature"><tbody><tr><th>经办人（签字）</th><td></td><th>核对机构（盖章）</th><td></td></tr>'
        "</tbody></table>"
    )
    out.append("</body>\n</html>\n")
    return "\n".join(out)
