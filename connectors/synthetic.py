"""A deterministic synthetic population of Jilin households and a synthetic sharing unit answering about them.

Tests, benchmarks and the demo need people with valid ID numbers and units that hold plausible data about them,
without a single real person. Everything here is a pure function of a seed:

- ``Population(seed)`` addresses households by index: household i is computed from (seed, i) alone, so a million
  households cost no memory and the same index always gives the same people;
- a person's registered name is a function of (seed, ID number), so a unit answering under
  ``registered_name(id_number)`` agrees with the population: a query with the population's name is a hit, with any
  other name a NAME_MISMATCH;
- ``SyntheticAdapter`` decides from (seed, ID number, data category) whether its unit holds anything and, from the
  query's context as well, what: the same inputs give byte-identical records.

Randomness comes from BLAKE2b (keyed by seed and purpose) read as 32-bit words, with integer and basic float arithmetic
only, so results do not depend on the Python version or on ``random``'s algorithms.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from enum import StrEnum
from typing import TypeVar

from google.protobuf.message import Message
from hedui.v1 import records_pb2 as r

from common.categories import RECORD_FIELD, UNIT_DATA
from common.dates import to_pb
from common.idnumber import make_id_number
from connectors.adapters.base import AdapterError, Finding, LookupContext

T = TypeVar("T")

#: County-level divisions of Jilin Province (GB/T 2260), code -> name as an address starts.
JILIN_REGIONS: Mapping[str, str] = {
    "220102": "长春市南关区",
    "220103": "长春市宽城区",
    "220104": "长春市朝阳区",
    "220105": "长春市二道区",
    "220106": "长春市绿园区",
    "220112": "长春市双阳区",
    "220113": "长春市九台区",
    "220122": "长春市农安县",
    "220182": "榆树市",
    "220183": "德惠市",
    "220184": "公主岭市",
    "220202": "吉林市昌邑区",
    "220203": "吉林市龙潭区",
    "220204": "吉林市船营区",
    "220211": "吉林市丰满区",
    "220221": "吉林市永吉县",
    "220281": "蛟河市",
    "220282": "桦甸市",
    "220283": "舒兰市",
    "220284": "磐石市",
    "220302": "四平市铁西区",
    "220303": "四平市铁东区",
    "220322": "四平市梨树县",
    "220382": "双辽市",
    "220402": "辽源市龙山区",
    "220403": "辽源市西安区",
    "220421": "辽源市东丰县",
    "220502": "通化市东昌区",
    "220503": "通化市二道江区",
    "220581": "梅河口市",
    "220582": "集安市",
    "220602": "白山市浑江区",
    "220605": "白山市江源区",
    "220681": "临江市",
    "220702": "松原市宁江区",
    "220721": "前郭尔罗斯蒙古族自治县",
    "220781": "扶余市",
    "220802": "白城市洮北区",
    "220881": "洮南市",
    "220882": "大安市",
    "222401": "延吉市",
    "222402": "图们市",
    "222403": "敦化市",
    "222404": "珲春市",
    "222405": "龙井市",
    "222406": "和龙市",
}
JILIN_REGION_CODES: tuple[str, ...] = tuple(JILIN_REGIONS)
#: The city (first four digits) of each region, as a short name for certificates.
_CITIES = {
    "2201": "长春市",
    "2202": "吉林市",
    "2203": "四平市",
    "2204": "辽源市",
    "2205": "通化市",
    "2206": "白山市",
    "2207": "松原市",
    "2208": "白城市",
    "2224": "延边州",
}
#: Licence-plate letters of Jilin's cities (吉A is Changchun).
_PLATE_LETTERS = {
    "2201": "A",
    "2202": "B",
    "2203": "C",
    "2204": "D",
    "2205": "E",
    "2206": "F",
    "2207": "J",
    "2208": "G",
    "2224": "H",
}
#: Ages are computed against this day, so that a population does not change as the calendar moves.
REFERENCE_DATE = date(2025, 7, 1)

_SURNAMES = (
    "王李张刘陈杨黄赵吴周徐孙马朱胡郭何高林罗郑梁谢宋唐许韩冯邓曹彭曾肖田董袁潘于蒋蔡余杜叶程苏魏吕丁任沈姚卢"
    "姜崔钟谭陆汪范金石廖贾夏韦付方白邹孟熊秦邱江尹薛闫段雷侯龙史陶黎贺顾毛郝龚邵万钱严覃武戴莫孔向汤"
)
_MALE_GIVEN = "伟强磊军勇杰涛斌超明刚平辉鹏华飞鑫波宇浩凯健俊帆帅旭宁龙林峰国建志海东文新德成永庆兴春振宏亮光福生荣晨博"
_FEMALE_GIVEN = "芳娜敏静丽艳娟霞秀玲桂英慧巧美淑惠珠翠雅芝玉萍红月彩兰凤洁梅琳素云莲真环雪荣爱香燕婷佳欣颖"
_STREETS = (
    "人民大街", "解放大路", "自由大路", "亚泰大街", "西安大路", "重庆路", "建设街", "胜利街", "新华路", "延安大路",
    "光明路", "长江路", "幸福街", "和平大路", "团结路", "友谊路", "松江路", "北京大街", "民主街", "工农大路",
)  # fmt: skip
_BANKS = (
    "中国工商银行", "中国农业银行", "中国银行", "中国建设银行", "交通银行", "中国邮政储蓄银行", "吉林银行",
    "长春农村商业银行", "吉林九台农村商业银行", "招商银行",
)  # fmt: skip
_BROKERS = ("东北证券", "中信证券", "华泰证券", "国泰君安证券", "招商证券", "广发证券")
_INSURERS = ("中国人寿", "中国平安", "中国太平洋保险", "泰康人寿", "新华保险", "阳光人寿")
_CAR_MODELS = (
    "一汽大众捷达",
    "一汽红旗H5",
    "一汽奔腾B70",
    "一汽丰田卡罗拉",
    "大众宝来",
    "五菱宏光",
    "解放J6P",
    "哈弗H6",
)
_TRADE_WORDS = "鑫达顺通盛华宏远兴旺恒泰安康瑞丰德隆永昌金源万福"
_INDUSTRIES = ("商贸", "餐饮", "农机", "建材", "物流", "汽车修理", "粮食经销", "养殖", "装饰工程", "农业科技")
_DEPARTMENTS = ("人民政府办公室", "教育局", "财政局", "卫生健康局", "民政局", "第一中学", "人民医院", "自然资源局")
_CREDIT_CHARS = "0123456789ABCDEFGHJKLMNPQRTUWXY"
_CREDIT_WEIGHTS = (1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28)
_WORDS = struct.Struct("<16I")
_TWO_32 = 4294967296.0


class _Draw:
    """A stream of 32-bit words from BLAKE2b over (seed, purpose): cheap, reproducible, version-independent."""

    __slots__ = ("_block", "_hash", "_next", "_words")

    def __init__(self, hasher: hashlib.blake2b) -> None:
        self._hash = hasher
        self._words = _WORDS.unpack(hasher.digest())
        self._next = 0
        self._block = 0

    def word(self) -> int:
        if self._next == 16:
            self._block += 1
            more = self._hash.copy()
            more.update(self._block.to_bytes(4, "little"))
            self._words = _WORDS.unpack(more.digest())
            self._next = 0
        word: int = self._words[self._next]
        self._next += 1
        return word

    def below(self, n: int) -> int:
        """0 <= x < n (n up to 2**32 without visible bias)."""
        return self.word() * n >> 32

    def between(self, low: int, high: int) -> int:
        """low <= x <= high."""
        return low + self.below(high - low + 1)

    def unit(self) -> float:
        """0 <= x < 1."""
        return self.word() / _TWO_32

    def chance(self, p: float) -> bool:
        return self.word() < p * _TWO_32

    def pick(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]


def _plus_years(day: date, years: int) -> date:
    return date(day.year + years, day.month, min(day.day, 28) if day.month == 2 else day.day)


class Relation(StrEnum):
    """A member's place in the household as the verification list records it."""

    APPLICANT = "applicant"
    SPOUSE = "spouse"
    CHILD = "child"
    PARENT = "parent"
    #: 赡养、抚养、扶养义务人: e.g. an adult child living elsewhere, whose means count for the applicant.
    SUPPORT_OBLIGOR = "support_obligor"


@dataclass(frozen=True, slots=True)
class Member:
    """One synthetic person of a household."""

    id_number: str
    name: str
    relation: Relation
    birth_date: date
    is_male: bool


@dataclass(frozen=True, slots=True)
class Household:
    """A synthetic household: the applicant first, then spouse, children or support obligors, parents."""

    household_id: str
    index: int
    region_code: str
    members: tuple[Member, ...]

    @property
    def applicant(self) -> Member:
        return self.members[0]


class Population:
    """Synthetic households of the given regions, household i a pure function of (seed, i)."""

    def __init__(
        self, seed: int, regions: Sequence[str] = JILIN_REGION_CODES, *, reference_date: date = REFERENCE_DATE
    ) -> None:
        """``regions`` are GB/T 2260 county codes households are drawn from; ``reference_date`` is the day ages are
        counted to (birth dates are before it)."""
        if not regions:
            raise ValueError("a population needs at least one region")
        for code in regions:
            make_id_number(code, reference_date, 0)  # raises ValueError unless a 6-digit code
        self.seed = seed
        self.regions = tuple(regions)
        self.reference_date = reference_date
        self._base = hashlib.blake2b(digest_size=64, person=b"hedui.synthetic")
        self._base.update(f"{seed}\x1e".encode())

    def draw(self, key: bytes) -> _Draw:
        """The random stream for ``key`` under this population's seed (used by the synthetic adapter too)."""
        hasher = self._base.copy()
        hasher.update(key)
        return _Draw(hasher)

    def words(self, key: bytes) -> tuple[int, ...]:
        """Sixteen 32-bit words for ``key`` under this population's seed: one hash, for many yes/no decisions."""
        hasher = self._base.copy()
        hasher.update(key)
        return _WORDS.unpack(hasher.digest())

    def registered_name(self, id_number: str) -> str:
        """The name a synthetic unit holds for ``id_number``: the population's name for its people, and a stable
        made-up name for any other number. Given names follow the sex the number encodes."""
        key = id_number.strip().upper()
        w = self.words(b"name\x1f" + key.encode())
        male = int(key[16]) % 2 == 1 if len(key) == 18 and key[16].isdigit() else w[0] & 1 == 1
        # The ten most common surnames carry about a third of all people.
        surnames = _SURNAMES[:10] if w[1] < 0.33 * _TWO_32 else _SURNAMES
        given = _MALE_GIVEN if male else _FEMALE_GIVEN
        second = given[w[5] * len(given) >> 32] if w[3] < 0.7 * _TWO_32 else ""
        return surnames[w[2] * len(surnames) >> 32] + given[w[4] * len(given) >> 32] + second

    def household(self, index: int) -> Household:
        """Household number ``index`` (0 or more)."""
        if index < 0:
            raise ValueError("household index must not be negative")
        d = self.draw(b"household\x1f%d" % index)
        region = d.pick(self.regions)
        taken: set[str] = set()

        def person(relation: Relation, age: int, male: bool, where: str = region) -> Member:
            birth = self.reference_date - timedelta(days=age * 365 + age // 4 + d.below(365))
            sequence = 2 * d.below(500) + male  # GB 11643: odd for men, even for women
            id_number = make_id_number(where, birth, sequence)
            while id_number in taken:  # twins born on one day in one county: the next sequence number
                sequence = (sequence + 2) % 1000
                id_number = make_id_number(where, birth, sequence)
            taken.add(id_number)
            return Member(id_number, self.registered_name(id_number), relation, birth, male)

        age, male = d.between(18, 88), d.chance(0.5)
        members = [person(Relation.APPLICANT, age, male)]
        if age >= 22 and d.chance(0.6):
            members.append(person(Relation.SPOUSE, min(max(age + d.between(-6, 6), 20), 95), not male))
        for _ in range(d.pick((0, 0, 1, 1, 1, 2, 2, 3)) if age >= 20 else 0):
            child_age = age - d.between(20, 38)
            if child_age < 0:
                continue
            if child_age >= 18 and age >= 55 and d.chance(0.6):
                where = d.pick(self.regions) if d.chance(0.3) else region
                members.append(person(Relation.SUPPORT_OBLIGOR, child_age, d.chance(0.5), where))
            else:
                members.append(person(Relation.CHILD, child_age, d.chance(0.5)))
        if age <= 60 and d.chance(0.15):
            members.append(person(Relation.PARENT, age + d.between(20, 35), d.chance(0.5)))
        return Household(f"SYN-{region}-{index:08d}", index, region, tuple(members))

    def households(self, count: int, start: int = 0) -> Iterator[Household]:
        """Households ``start`` to ``start + count - 1``, computed one at a time."""
        for index in range(start, start + count):
            yield self.household(index)


# --- the synthetic unit ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Subject:
    id_number: str
    birth: date
    is_male: bool
    age: int
    region: str


class _Case:
    """One (subject, category) being made up: the random stream and what the values must respect."""

    __slots__ = ("adult_on", "context", "d", "s")

    def __init__(self, d: _Draw, s: _Subject, context: LookupContext) -> None:
        self.d, self.s, self.context = d, s, context
        self.adult_on = _plus_years(s.birth, 18)

    def day(self, low: date, high: date) -> date:
        """A day in [low, high]; high when the range is empty."""
        span = high.toordinal() - low.toordinal()
        return high if span <= 0 else date.fromordinal(low.toordinal() + self.d.below(span + 1))

    def past(self, floor: date = date(1995, 1, 1)) -> date:
        """A day since the subject came of age (and since ``floor``), at the latest the assets date."""
        return self.day(max(self.adult_on, floor), self.context.assets_as_of)

    def yuan(self, low: int, high: int) -> int:
        """Whole yuan in [low, high], as fen."""
        return self.d.between(low, high) * 100

    def long_tail(self, typical_yuan: int, tail_share: float = 0.12) -> int:
        """Fen: mostly small amounts under ``typical_yuan``, a share of them up to fifty times it."""
        u = self.d.unit()
        # Basic float arithmetic only (no pow, no log): IEEE rounding makes it the same on every machine.
        yuan = typical_yuan / (1.0 - 0.98 * u) if self.d.chance(tail_share) else typical_yuan * u * u
        return int(yuan * 100) + self.d.below(100)

    def city(self) -> str:
        return _CITIES.get(self.s.region[:4], "长春市")

    def address(self) -> str:
        d = self.d
        return (
            f"吉林省{JILIN_REGIONS.get(self.s.region, '长春市朝阳区')}{d.pick(_STREETS)}{d.between(1, 2999)}号"
            f"{d.between(1, 30)}栋{d.between(1, 6)}单元{d.between(1, 18)}{d.between(1, 4):02d}室"
        )

    def income_months(self) -> tuple[int, int]:
        """The income period as month numbers (year * 12 + month - 1), first <= last."""
        first = self.context.income_from[0] * 12 + self.context.income_from[1] - 1
        last = self.context.income_to[0] * 12 + self.context.income_to[1] - 1
        return min(first, last), last


def _year_month(months: int) -> r.YearMonth:
    return r.YearMonth(year=months // 12, month=months % 12 + 1)


def _deposit(c: _Case) -> Message:
    d = c.d
    return r.Deposit(
        institution=d.pick(_BANKS),
        account_suffix=f"{d.below(10000):04d}",
        product=d.pick(("活期", "活期", "活期", "定期", "整存整取", "大额存单")),
        balance_fen=c.long_tail(50_000),
        as_of=to_pb(c.context.assets_as_of),
    )


_LOAN_KINDS = (
    ("个人住房贷款", 200_000, 800_000, 30),
    ("个人消费贷款", 10_000, 200_000, 5),
    ("经营贷款", 50_000, 1_000_000, 5),
    ("汽车贷款", 50_000, 200_000, 5),
    ("助学贷款", 8_000, 48_000, 10),
)


def _loan(c: _Case) -> Message:
    d = c.d
    kind, low, high, max_years = d.pick(_LOAN_KINDS)
    principal = c.yuan(low, high)
    start = c.past(date(2005, 1, 1))
    maturity = _plus_years(start, d.between(1, max_years))
    total_days = max(1, maturity.toordinal() - start.toordinal())
    left = max(0, maturity.toordinal() - c.context.assets_as_of.toordinal())
    return r.Loan(
        institution=d.pick(_BANKS),
        loan_type=kind,
        principal_fen=principal,
        outstanding_fen=principal * left // total_days,
        start_date=to_pb(start),
        maturity_date=to_pb(maturity),
    )


def _wealth_product(c: _Case) -> Message:
    d = c.d
    bank = d.pick(_BANKS)
    series = d.pick(("稳健", "安心", "添利", "天天盈", "季季享"))
    return r.WealthProduct(
        institution=bank,
        product_name=f"{bank}{series}{d.between(1, 99)}号理财产品",
        holding_fen=c.long_tail(100_000),
        as_of=to_pb(c.context.assets_as_of),
    )


def _securities(c: _Case) -> Message:
    d = c.d
    return r.SecuritiesHolding(
        institution=d.pick(_BROKERS),
        account_suffix=f"{d.below(10000):04d}",
        stock_market_value_fen=c.long_tail(30_000) if d.chance(0.7) else 0,
        fund_market_value_fen=c.long_tail(20_000) if d.chance(0.5) else 0,
        cash_balance_fen=c.long_tail(2_000),
        as_of=to_pb(c.context.assets_as_of),
    )


def _commercial_insurance(c: _Case) -> Message:
    d = c.d
    start = c.past(date(2000, 1, 1))
    premium = c.yuan(1_000, 20_000)
    years = max(1, c.context.assets_as_of.year - start.year)
    policy = d.pick(("寿险", "分红险", "年金险", "重大疾病保险", "意外伤害保险"))
    return r.CommercialInsurance(
        insurer=d.pick(_INSURERS),
        policy_type=policy,
        annual_premium_fen=premium,
        cash_value_fen=0 if policy == "意外伤害保险" else premium * years * d.between(40, 90) // 100,
        benefits_paid_fen=c.yuan(2_000, 100_000) if d.chance(0.1) else 0,
        start_date=to_pb(start),
    )


def _real_estate(c: _Case) -> Message:
    d = c.d
    registered = c.past(date(1998, 1, 1))
    use = d.pick(("住宅",) * 12 + ("商业", "商业", "车库", "车库", "工业", "其他"))
    square_metres = {"住宅": (45, 140), "车库": (12, 35)}.get(use, (20, 300))
    co_owners = d.pick((0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2))
    city = c.city()
    if registered.year >= 2015:  # unified real-estate certificates since the 2015 registration reform
        certificate = f"吉({registered.year}){city}不动产权第{d.below(10**7):07d}号"
    else:
        certificate = f"{city}房权证字第{d.below(10**8):08d}号"
    return r.RealEstate(
        certificate_no=certificate,
        location=c.address(),
        area_centi_m2=d.between(*square_metres) * 100 + d.below(100),
        use=use,
        co_owner_count=co_owners,
        ownership="单独所有" if co_owners == 0 else d.pick(("共同共有", "按份共有")),
        registered_on=to_pb(registered),
    )


_PLATE_CHARS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _vehicle(c: _Case) -> Message:
    d = c.d
    letter = _PLATE_LETTERS.get(c.s.region[:4], "A")
    tail = f"{d.below(100000):05d}" if d.chance(0.5) else d.pick(_PLATE_CHARS) + f"{d.below(10000):04d}"
    kind = d.pick(
        ("小型轿车",) * 6 + ("小型普通客车", "小型普通客车", "轻型普通货车", "重型半挂牵引车", "普通二轮摩托车")
    )
    return r.Vehicle(
        plate=f"吉{letter}{tail}",
        model=d.pick(_CAR_MODELS),
        vehicle_type=kind,
        first_registration=to_pb(c.past(date(2003, 1, 1))),
        status=d.pick(("正常",) * 8 + ("抵押", "注销")),
    )


def _credit_code(c: _Case, sole_trader: bool) -> str:
    """统一社会信用代码 (GB 32100): department 9, kind 1 or 2, region, a 9-character organisation code, check."""
    d = c.d
    body = "9" + ("2" if sole_trader else "1") + c.s.region + "".join(d.pick(_CREDIT_CHARS) for _ in range(9))
    total = sum(_CREDIT_CHARS.index(ch) * w for ch, w in zip(body, _CREDIT_WEIGHTS, strict=True))
    return body + _CREDIT_CHARS[(31 - total % 31) % 31]


def _business(c: _Case) -> Message:
    d = c.d
    role = d.pick(
        (r.BUSINESS_ROLE_SOLE_TRADER,) * 3 + (r.BUSINESS_ROLE_LEGAL_REPRESENTATIVE,) * 2 + (r.BUSINESS_ROLE_INVESTOR,)
    )
    sole = role == r.BUSINESS_ROLE_SOLE_TRADER
    trade = d.pick(_TRADE_WORDS) + d.pick(_TRADE_WORDS)
    industry = d.pick(_INDUSTRIES)
    if sole:
        name, capital, share = (
            f"{JILIN_REGIONS.get(c.s.region, c.city())}{trade}{industry}店",
            c.yuan(1, 30) * 1000,
            10000,
        )
    else:
        name, capital = f"{c.city()}{trade}{industry}有限公司", c.yuan(10, 500) * 10_000
        share = 10000 if role == r.BUSINESS_ROLE_LEGAL_REPRESENTATIVE and d.chance(0.5) else d.between(5, 60) * 100
    return r.BusinessRegistration(
        credit_code=_credit_code(c, sole),
        enterprise_name=name,
        role=role,
        registered_capital_fen=capital,
        share_basis_points=share,
        status=d.pick(("存续",) * 7 + ("注销", "吊销")),
        established_on=to_pb(c.past(date(2000, 1, 1))),
    )


def _tax(c: _Case) -> Message:
    d = c.d
    first, last = c.income_months()
    start = first + d.below(last - first + 1)
    end = start + d.below(last - start + 1)
    months = end - start + 1
    self_employed = d.chance(0.3)
    monthly = c.yuan(3_000, 15_000) if d.chance(0.85) else c.yuan(15_000, 60_000)
    # Self-employed: assessed collection of 0.5 % to 2 % of turnover; wages: the 3 % band above 5,000 yuan a month.
    wage_tax = max(0, monthly - 500_000) * 3 // 100 * months
    tax = monthly * months * d.between(5, 20) // 1000 if self_employed else wage_tax
    return r.TaxRecord(
        period_from=_year_month(start),
        period_to=_year_month(end),
        tax_type="个体工商户经营所得" if self_employed else "个人所得税（工资薪金所得）",
        taxable_income_fen=monthly * months,
        tax_paid_fen=tax,
        self_employed=self_employed,
    )


def _social_insurance(c: _Case) -> Message:
    d = c.d
    as_of = c.context.assets_as_of
    month_now = as_of.year * 12 + as_of.month - 1
    employee = d.chance(0.55)
    retired = c.s.age >= (60 if c.s.is_male else 55)
    if retired:
        status, benefit = "领取待遇", c.yuan(2_000, 4_800) if employee else c.yuan(110, 400)
        last = month_now - 12 * (c.s.age - 60 if c.s.is_male else c.s.age - 55) - 1
    else:
        status, benefit = d.pick(("参保缴费",) * 4 + ("中断",)), 0
        last = month_now - 1 if status == "参保缴费" else month_now - d.between(2, 60)
    return r.SocialInsurance(
        insurance_type="城镇职工基本养老保险" if employee else "城乡居民基本养老保险",
        status=status,
        monthly_benefit_fen=benefit,
        contribution_base_fen=c.yuan(4_000, 20_000) if employee else c.yuan(100, 2_000),
        last_contribution=_year_month(max(last, 1990 * 12)),
    )


def _employment(c: _Case) -> Message:
    d = c.d
    if c.s.age >= (60 if c.s.is_male else 55):
        status = "退休"
    else:
        status = d.pick(("就业",) * 13 + ("灵活就业",) * 3 + ("失业登记",) * 4)
    employer = f"{c.city()}{d.pick(_TRADE_WORDS)}{d.pick(_TRADE_WORDS)}{d.pick(_INDUSTRIES)}有限公司"
    return r.Employment(
        status=status,
        employer=employer if status in ("就业", "退休") else "",
        since=to_pb(c.past(date(1985, 1, 1))),
        monthly_unemployment_benefit_fen=c.yuan(1_500, 1_900) if status == "失业登记" else 0,
    )


def _housing_fund(c: _Case) -> Message:
    d = c.d
    paying = d.chance(0.7)
    monthly = c.yuan(200, 3_000)
    return r.HousingFund(
        balance_fen=monthly * d.between(1, 36) + c.long_tail(20_000),
        monthly_contribution_fen=monthly if paying else 0,
        loan_outstanding_fen=c.yuan(50_000, 600_000) if d.chance(0.2) else 0,
        status="正常缴存" if paying else "封存",
        as_of=to_pb(c.context.assets_as_of),
    )


def _housing_transaction(c: _Case) -> Message:
    d = c.d
    signed = c.past(date(2008, 1, 1))
    return r.HousingTransaction(
        contract_no=f"WQ{signed.year}{c.s.region}{d.below(10**6):06d}",
        location=c.address(),
        price_fen=c.yuan(200, 1_500) * 1000,
        contract_date=to_pb(signed),
        role=d.pick(("买方", "卖方")),
    )


def _agriculture_subsidy(c: _Case) -> Message:
    d = c.d
    first, last = c.income_months()
    kind = d.pick(("耕地地力保护补贴", "耕地地力保护补贴", "玉米生产者补贴", "大豆生产者补贴", "农机购置补贴"))
    # Machinery: a one-off amount; land subsidies: 5 to 60 mu at 60 to 200 yuan per mu.
    amount = c.yuan(3_000, 30_000) if kind == "农机购置补贴" else d.between(5, 60) * c.yuan(60, 200)
    return r.AgricultureSubsidy(subsidy_type=kind, amount_fen=amount, year=d.between(first // 12, last // 12))


def _forestry_loan(c: _Case) -> Message:
    d = c.d
    principal = c.yuan(30, 500) * 1000
    return r.ForestryLoan(
        institution=d.pick(("中国农业银行", "中国邮政储蓄银行", "吉林九台农村商业银行", "长春农村商业银行")),
        principal_fen=principal,
        interest_subsidy_fen=principal * d.between(15, 30) // 1000,
        start_date=to_pb(c.past(date(2010, 1, 1))),
    )


def _health_insurance(c: _Case) -> Message:
    d = c.d
    employee = c.s.age >= 18 and d.chance(0.4)
    return r.HealthInsurance(
        scheme="城镇职工基本医疗保险" if employee else "城乡居民基本医疗保险",
        status="参保" if d.chance(0.95) else "中断",
        large_medical_costs_fen=c.yuan(5_000, 300_000) if d.chance(0.12) else 0,
        year=c.context.income_to[0],
    )


def _disability(c: _Case) -> Message:
    d = c.d
    kind = d.below(7)
    grade = d.between(1, 4)
    return r.Disability(
        # Second-generation certificates: the ID number, then the type (1-7) and the grade (1-4).
        certificate_no=f"{c.s.id_number}{kind + 1}{grade}",
        disability_type=("视力", "听力", "言语", "肢体", "智力", "精神", "多重")[kind],
        grade=grade,
        issued_on=to_pb(c.day(max(c.s.birth, date(2008, 1, 1)), c.context.assets_as_of)),
    )


def _civil_service_post(c: _Case) -> Message:
    d = c.d
    return r.CivilServicePost(
        organisation=JILIN_REGIONS.get(c.s.region, c.city()) + d.pick(_DEPARTMENTS),
        post_type=d.pick(("行政编制", "事业编制", "事业编制")),
        since=to_pb(c.past(date(1985, 1, 1))),
    )


def _household_register(c: _Case) -> Message:
    d = c.d
    if c.s.age < 18:
        relation = "子" if c.s.is_male else "女"
    else:
        relation = d.pick(("户主", "户主", "配偶", "子" if c.s.is_male else "女", "父" if c.s.is_male else "母"))
    return r.HouseholdRegister(
        household_no=f"{d.between(100_000_000, 999_999_999)}",
        address=c.address(),
        relation_to_head=relation,
        status=d.pick(("正常",) * 30 + ("迁出",)),
    )


def _death(c: _Case) -> Message:
    as_of = c.context.assets_as_of
    return r.DeathRecord(date_of_death=to_pb(c.day(max(c.s.birth, as_of - timedelta(days=3 * 365)), as_of)))


def _marriage(c: _Case) -> Message:
    registered = c.day(_plus_years(c.s.birth, 20), c.context.assets_as_of)
    return r.MarriageRecord(status=c.d.pick(("结婚",) * 6 + ("离婚",)), registered_on=to_pb(registered))


def _social_assistance(c: _Case) -> Message:
    d = c.d
    programme = d.pick(("城市低保", "城市低保", "农村低保", "农村低保", "特困供养", "临时救助"))
    amount = {"城市低保": (200, 750), "农村低保": (100, 450), "特困供养": (600, 1_200)}.get(programme, (500, 3_000))
    return r.SocialAssistance(
        programme=programme,
        monthly_amount_fen=c.yuan(*amount),
        since=to_pb(c.day(max(c.s.birth, date(2010, 1, 1)), c.context.assets_as_of)),
        status=d.pick(("享受中",) * 9 + ("停发",)),
    )


def _education_aid(c: _Case) -> Message:
    d = c.d
    kind, low, high = d.pick(
        (("学前教育资助", 500, 1_000), ("国家助学金", 1_000, 3_300), ("生源地助学贷款", 8_000, 16_000))
    )
    return r.EducationAid(aid_type=kind, amount_fen=c.yuan(low, high), year=c.context.income_to[0])


def _state_payroll(c: _Case) -> Message:
    d = c.d
    return r.StatePayroll(
        organisation=JILIN_REGIONS.get(c.s.region, c.city()) + d.pick(_DEPARTMENTS),
        monthly_salary_fen=c.yuan(3_500, 9_000),
        since=to_pb(c.past(date(1985, 1, 1))),
    )


def _transport_qualification(c: _Case) -> Message:
    d = c.d
    as_of = c.context.assets_as_of
    return r.TransportQualification(
        qualification_type=d.pick(("道路旅客运输驾驶员", "道路货物运输驾驶员", "出租汽车驾驶员")),
        certificate_no=c.s.id_number,  # the qualification certificate number is the holder's ID number
        valid_until=to_pb(as_of + timedelta(days=d.between(-365, 6 * 365))),
    )


def _vessel(c: _Case) -> Message:
    d = c.d
    kind, low, high = d.pick(
        (("渔船", 2, 50), ("渔船", 2, 50), ("货船", 100, 1_500), ("客船", 20, 300), ("游艇", 5, 40))
    )
    registered = c.past(date(2000, 1, 1))
    return r.Vessel(
        registration_no=f"(吉){c.city()}船登({registered.year}){d.below(10000):04d}号",
        vessel_type=kind,
        gross_tonnage=d.between(low, high),
        registered_on=to_pb(registered),
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    #: Share of eligible people the unit holds anything for.
    rate: float
    #: Ages (at the assets date) the category applies to, inclusive.
    ages: tuple[int, int]
    #: At most this many records per person.
    most: int
    make: Callable[[_Case], Message]


_ADULT, _ANY_AGE, _WORKING = (18, 150), (0, 150), (18, 65)
_PLANS: Mapping[int, _Plan] = {
    r.DATA_CATEGORY_DEPOSITS: _Plan(0.40, _ANY_AGE, 3, _deposit),
    r.DATA_CATEGORY_LOANS: _Plan(0.08, _ADULT, 2, _loan),
    r.DATA_CATEGORY_WEALTH_PRODUCTS: _Plan(0.06, _ADULT, 2, _wealth_product),
    r.DATA_CATEGORY_SECURITIES: _Plan(0.04, _ADULT, 2, _securities),
    r.DATA_CATEGORY_COMMERCIAL_INSURANCE: _Plan(0.10, _ADULT, 3, _commercial_insurance),
    r.DATA_CATEGORY_REAL_ESTATE: _Plan(0.25, _ADULT, 3, _real_estate),
    r.DATA_CATEGORY_VEHICLES: _Plan(0.15, _ADULT, 2, _vehicle),
    r.DATA_CATEGORY_BUSINESS_REGISTRATION: _Plan(0.05, _ADULT, 2, _business),
    r.DATA_CATEGORY_TAX: _Plan(0.20, _ADULT, 3, _tax),
    r.DATA_CATEGORY_SOCIAL_INSURANCE: _Plan(0.85, _ADULT, 2, _social_insurance),
    r.DATA_CATEGORY_EMPLOYMENT: _Plan(0.45, (16, 150), 1, _employment),
    r.DATA_CATEGORY_HOUSING_FUND: _Plan(0.18, _ADULT, 1, _housing_fund),
    r.DATA_CATEGORY_HOUSING_TRANSACTIONS: _Plan(0.04, _ADULT, 2, _housing_transaction),
    r.DATA_CATEGORY_AGRICULTURE_SUBSIDIES: _Plan(0.12, _ADULT, 3, _agriculture_subsidy),
    r.DATA_CATEGORY_FORESTRY_LOANS: _Plan(0.01, _ADULT, 1, _forestry_loan),
    r.DATA_CATEGORY_HEALTH_INSURANCE: _Plan(0.92, _ANY_AGE, 1, _health_insurance),
    r.DATA_CATEGORY_DISABILITY: _Plan(0.03, _ANY_AGE, 1, _disability),
    r.DATA_CATEGORY_CIVIL_SERVICE_POST: _Plan(0.02, _WORKING, 1, _civil_service_post),
    r.DATA_CATEGORY_HOUSEHOLD_REGISTER: _Plan(0.98, _ANY_AGE, 1, _household_register),
    r.DATA_CATEGORY_DEATH_RECORD: _Plan(0.005, _ADULT, 1, _death),
    r.DATA_CATEGORY_MARRIAGE_RECORD: _Plan(0.60, (20, 150), 1, _marriage),
    r.DATA_CATEGORY_SOCIAL_ASSISTANCE: _Plan(0.10, _ANY_AGE, 1, _social_assistance),
    r.DATA_CATEGORY_EDUCATION_AID: _Plan(0.05, (3, 25), 2, _education_aid),
    r.DATA_CATEGORY_STATE_PAYROLL: _Plan(0.03, _ADULT, 1, _state_payroll),
    r.DATA_CATEGORY_TRANSPORT_QUALIFICATION: _Plan(0.03, _WORKING, 1, _transport_qualification),
    r.DATA_CATEGORY_VESSELS: _Plan(0.005, _ADULT, 1, _vessel),
}
#: Share of eligible people a synthetic unit holds anything for, per data category.
RATES: Mapping[int, float] = {category: plan.rate for category, plan in _PLANS.items()}
#: Ages (at the assets date, inclusive) for which a synthetic unit holds data of a category.
AGE_RANGES: Mapping[int, tuple[int, int]] = {category: plan.ages for category, plan in _PLANS.items()}


def _subject(id_number: str, as_of: date) -> _Subject | None:
    """What the ID number itself says (birth date, sex, region), or None for a number that says nothing."""
    key = id_number.strip().upper()
    if len(key) != 18:
        return None
    try:
        birth = date(int(key[6:10]), int(key[10:12]), int(key[12:14]))
        male = int(key[16]) % 2 == 1
    except ValueError:
        return None
    if birth > as_of:
        return None
    age = as_of.year - birth.year - ((as_of.month, as_of.day) < (birth.month, birth.day))
    return _Subject(key, birth, male, age, key[:6])


class SyntheticAdapter:
    """A sharing unit of ``unit_category`` that holds made-up data about anyone with a well-formed ID number.

    Whether the unit holds anything for (ID number, category) is decided by (seed, ID number, category) alone,
    at the rates of ``RATES`` among people of the ages in ``AGE_RANGES``; the records (one to three) also depend on
    the query's context: assets as of its date, tax within its income period, produced at its time."""

    def __init__(self, population: Population, unit_category: int) -> None:
        if unit_category not in UNIT_DATA:
            raise AdapterError(f"unknown unit category {unit_category}")
        self._population = population
        self.categories: tuple[int, ...] = UNIT_DATA[unit_category]
        self._plans = {category: (f"\x1f{category}".encode(), _PLANS[category]) for category in self.categories}

    def fetch(self, id_numbers: Sequence[str], context: LookupContext) -> dict[str, list[Finding]]:
        """Findings per ID number for the context's categories; numbers the unit holds nothing for are absent."""
        try:
            wanted = [(category, *self._plans[category]) for category in dict.fromkeys(context.categories)]
        except KeyError:
            raise AdapterError("a requested data category is not held by this synthetic unit") from None
        produced = context.produced_at_ms
        found: dict[str, list[Finding]] = {}
        for id_number in dict.fromkeys(id_numbers):
            subject = _subject(id_number, context.assets_as_of)
            if subject is None:
                continue
            records: list[r.Record] = []
            key = b"unit\x1f" + subject.id_number.encode()
            # Whether the unit holds anything: word (category mod 16) of one hash per 16 categories, so that the
            # many absent (person, category) pairs cost a table look-up, not a hash each.
            presence: dict[int, tuple[int, ...]] = {}
            for category, suffix, plan in wanted:
                if not plan.ages[0] <= subject.age <= plan.ages[1]:
                    continue
                block = category >> 4
                words = presence.get(block)
                if words is None:
                    words = presence[block] = self._population.words(key + b"\x1e%d" % block)
                if words[category & 15] >= plan.rate * _TWO_32:
                    continue
                d = self._population.draw(key + suffix)
                u = d.unit()
                count = min(plan.most, 1 if u < 0.7 else 2 if u < 0.9 else 3)
                case = _Case(d, subject, context)
                field = RECORD_FIELD[category]
                for _ in range(count):
                    record = r.Record(category=category, produced_at_ms=produced)  # type: ignore[arg-type]
                    getattr(record, field).CopyFrom(plan.make(case))
                    records.append(record)
            if records:
                name = self._population.registered_name(subject.id_number)
                found[id_number] = [Finding(name, record) for record in records]
        return found

    def close(self) -> None:
        """Nothing to release."""
